"""The fedlvc codec: a convolutional VAE with a uniform posterior and a learned factorized prior.

Ballé et al., "End-to-end optimized image compression" (ICLR 2017) with the quality-level gain vectors
of Cui et al., "Asymmetric gained deep image compression with continuous rate adaptation" (CVPR 2021)::

    x ─► g_a ─► y ─► ×gain[q] ─► (+U(-½,½) | round) ─► ŷ ─► ×inv_gain[q] ─► g_s ─► x̂
                                                       │
                                              prior[q]: p(ŷ) = Σ_k w_k [σ((ŷ+½-μ_k)/s_k) − σ((ŷ-½-μ_k)/s_k)]

One model serves every quality level ``q``: a level scales the latent before quantization (a larger gain
means a finer quantization step) and selects its own factorized prior. With the unit-width uniform
posterior the KL term of the ELBO is exactly the rate ``−log2 p(ŷ)`` in bits, so the per-sample loss is
``λ_q · 255² · MSE + bits per pixel``.

Opacus: only Conv2d and Embedding hold parameters (both have per-sample gradient samplers), the
noise is added in the parent, and every parameter is reached through a module's ``forward``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from common.config.options import PFrameRule

from .contexts import IN_FRAME_VALUES, P_GROUPS, TEMPORAL_CONTEXTS, next_history, p_context
from .errors import FedlvcError
from .hyperprior import (
    GDN,
    Z_SUPPORT,
    AnalysisGDN,
    HyperAnalysis,
    HyperSynthesis,
    SynthesisGDN,
    gaussian_likelihood,
)
from .pframe import PFrameCoder
from .priors import LIKELIHOOD_FLOOR, LevelPriorParams, TemporalPrior, latent_likelihood
from .rdo import choose_p_latent, synthesis_sensitivity
from .transforms import AnalysisTransform, LevelGains, SynthesisTransform, without_biases

ARCHITECTURE = "fedlvc-factorized-gain-v3"  # v2 plus contexts inside a P-frame (channel groups)
ARCHITECTURE_V2 = "fedlvc-factorized-gain-v2"  # v1 plus the temporal (P-frame) prior; still loads and decodes
ARCHITECTURE_INTRA = "fedlvc-factorized-gain-v1"  # intra-only models still load (and decode their streams)
# GDN transforms and a mean-scale hyperprior for I-frames, exact integer coding tables (common.hyperprior);
# P-frames as v3.
ARCHITECTURE_V4 = "fedlvc-hyperprior-gdn-v4"
ARCHITECTURES = (ARCHITECTURE, ARCHITECTURE_V2, ARCHITECTURE_INTRA, ARCHITECTURE_V4)


@dataclass(frozen=True)
class CodecConfig:
    """Architecture of the codec; serialised next to the weights and hashed into the fingerprint."""

    architecture: str = ARCHITECTURE
    channels: int = 64  # width of the transforms
    latent_channels: int = 96  # channels of y
    mixtures: int = 3  # logistic components per channel of the prior
    support: int = 255  # coded symbols lie in [-support, support]
    lambdas: tuple[float, ...] = (0.0018, 0.0035, 0.0067, 0.013, 0.025, 0.05)  # one per quality level
    stride: int = 16  # total downsampling of g_a; frames are padded to a multiple of it
    hyper_channels: int = 0  # channels of the hyper-latent z (architecture v4 only; 0 otherwise)
    adapters: bool = False  # FiLM adapters after the transforms' convolutions (common.transforms.FiLM)
    motion: bool = False  # P-frames as motion-compensated residuals (common.residual) instead of latent P-frames

    @property
    def num_levels(self) -> int:
        return len(self.lambdas)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lambdas"] = list(self.lambdas)
        if not self.hyper:
            del d["hyper_channels"]  # configs (and fingerprints) of v1-v3 models are as they always were
        if not self.adapters:
            del d["adapters"]  # likewise for models without adapters
        if not self.motion:
            del d["motion"]  # and without motion-compensated P-frames
        return d

    @classmethod
    def v4(cls, **kw) -> CodecConfig:
        """The default configuration of architecture v4."""
        base = dict(
            architecture=ARCHITECTURE_V4,
            channels=64,
            latent_channels=128,
            hyper_channels=64,
            lambdas=(0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16),
        )
        return cls(**{**base, **kw})

    @classmethod
    def from_dict(cls, d: dict) -> CodecConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise FedlvcError(f"model config has unknown keys: {sorted(unknown)}")
        d = dict(d)
        try:
            if "lambdas" in d:
                d["lambdas"] = tuple(float(v) for v in d["lambdas"])
        except (TypeError, ValueError):
            raise FedlvcError(f"model config lambdas must be a list of numbers, not {d['lambdas']!r}") from None
        cfg = cls(**d)
        if cfg.architecture not in ARCHITECTURES:
            raise FedlvcError(f"model architecture {cfg.architecture!r} is not supported (expected {ARCHITECTURE!r})")
        cfg.check_bounds()
        return cfg

    # Limits on what a model config (from a checkpoint, or from the server's message to a site) may make us
    # allocate: far above the shipped model (64 / 96 / 3 / 255 / 6 levels), far below what exhausts a machine.
    LIMITS = {
        "channels": (1, 512),
        "latent_channels": (1, 512),
        "mixtures": (1, 16),
        "support": (1, 1023),
        "hyper_channels": (0, 512),
    }
    MAX_LEVELS = 16

    def check_bounds(self) -> None:
        for key, (lo, hi) in self.LIMITS.items():
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise FedlvcError(f"model config {key} must be an integer in {lo}..{hi}, not {value!r}")
        if not 1 <= len(self.lambdas) <= self.MAX_LEVELS or not all(0 < v <= 10 for v in self.lambdas):
            raise FedlvcError(
                f"model config needs 1..{self.MAX_LEVELS} quality levels with lambdas in (0, 10], "
                f"not {list(self.lambdas)!r}"
            )
        if self.stride != 16:
            raise FedlvcError(f"model config stride must be 16 (four stride-2 stages), not {self.stride!r}")
        for key in ("adapters", "motion"):
            if not isinstance(getattr(self, key), bool):
                raise FedlvcError(f"model config {key} must be true or false, not {getattr(self, key)!r}")
        if self.motion and self.architecture not in (ARCHITECTURE, ARCHITECTURE_V4):
            raise FedlvcError(f"model config motion needs architecture {ARCHITECTURE!r} or {ARCHITECTURE_V4!r}")
        if self.hyper != (self.hyper_channels > 0):
            raise FedlvcError(
                f"model config hyper_channels must be at least 1 for architecture {ARCHITECTURE_V4!r} and 0 "
                f"otherwise, not {self.hyper_channels!r}"
            )

    @property
    def hyper(self) -> bool:
        """Whether I-frames are coded under the mean-scale hyperprior (architecture v4)."""
        return self.architecture == ARCHITECTURE_V4

    @property
    def temporal(self) -> bool:
        """Whether the model has a P-frame prior (can code groups of pictures longer than 1)."""
        return self.architecture in (ARCHITECTURE, ARCHITECTURE_V2, ARCHITECTURE_V4)

    @property
    def p_groups(self) -> int:
        """Channel groups a P-frame latent is coded in (1: all at once, as architecture v2 does)."""
        return P_GROUPS if self.architecture in (ARCHITECTURE, ARCHITECTURE_V4) else 1

    @property
    def p_contexts(self) -> int:
        """Contexts of the P-frame prior per (level, channel)."""
        return TEMPORAL_CONTEXTS * (IN_FRAME_VALUES if self.p_groups > 1 else 1)


class FedlvcCodec(nn.Module):
    """The codec. ``forward(x, levels)`` is the training path; coding lives in :mod:`common.codec`.

    x: (B, 3, H, W) RGB in [0, 1] with H, W multiples of ``cfg.stride``; levels: (B,) int64 in [0, L).
    """

    def __init__(self, cfg: CodecConfig | None = None):
        super().__init__()
        self.cfg = cfg or CodecConfig()
        n = self.cfg.num_levels
        if self.cfg.hyper:
            self.g_a, self.g_s = AnalysisGDN(self.cfg), SynthesisGDN(self.cfg)
        else:
            self.g_a, self.g_s = AnalysisTransform(self.cfg), SynthesisTransform(self.cfg)
        # Higher levels quantize more finely: gains from 0.5× to 2× of the middle level at start.
        init = torch.linspace(math.log(0.5), math.log(2.0), n)
        self.gain = LevelGains(n, self.cfg.latent_channels, init)
        self.inv_gain = LevelGains(n, self.cfg.latent_channels, -init)
        if self.cfg.hyper:
            self.h_a, self.h_s = HyperAnalysis(self.cfg), HyperSynthesis(self.cfg)
            self.z_prior = LevelPriorParams(n, self.cfg.hyper_channels, self.cfg.mixtures)
        else:
            self.prior = LevelPriorParams(n, self.cfg.latent_channels, self.cfg.mixtures)
        if self.cfg.temporal:
            self.temporal = TemporalPrior(n, self.cfg.latent_channels, self.cfg.p_contexts)
        if self.cfg.motion:  # the residual codec of motion-compensated P-frames (common.residual), zero to zero
            res_cfg = replace(self.cfg, adapters=False)
            self.res_g_a, self.res_g_s = (without_biases(type(t)(res_cfg)) for t in (self.g_a, self.g_s))
            self.res_gain = LevelGains(n, self.cfg.latent_channels, init)
            self.res_inv_gain = LevelGains(n, self.cfg.latent_channels, -init)
            self.res_prior = TemporalPrior(n, self.cfg.latent_channels, self.cfg.p_contexts)

    def check_level(self, level: int) -> None:
        if not 0 <= level < self.cfg.num_levels:
            raise FedlvcError(f"quality {level + 1} is out of range: this model has qualities 1..{self.cfg.num_levels}")

    def analysis(self, x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """Scaled latent (before quantization) of frames in [0, 1]."""
        return self.g_a(x - 0.5) * self.gain(levels)

    def synthesis(self, y_hat: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """Frames in [0, 1] (unclamped) from quantized latents."""
        return self.g_s(y_hat * self.inv_gain(levels)) + 0.5

    def residual_analysis(self, r: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """Scaled latent of motion-compensated residuals ``r`` = frame − prediction (in [−1, 1]; motion models)."""
        return self.res_g_a(r) * self.res_gain(levels)

    def residual_synthesis(self, y_hat: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """Residuals (unclamped, [0, 1] units) from quantized residual latents (motion models)."""
        return self.res_g_s(y_hat * self.res_inv_gain(levels))

    def forward(self, x: torch.Tensor, levels: torch.Tensor) -> dict:
        y = self.analysis(x, levels)
        if self.training:
            y_tilde = y + torch.empty_like(y).uniform_(-0.5, 0.5)
        else:
            y_tilde = torch.round(y)
        x_hat = self.synthesis(y_tilde, levels)
        return {"x_hat": x_hat, "likelihoods": self.intra_likelihoods(y_tilde, levels)}

    def hyper_latent(self, y_tilde: torch.Tensor) -> torch.Tensor:
        """z̃ of (noisy or integer) latents: z + U(-½,½) when training, else the coded integers."""
        z = self.h_a(y_tilde)
        if self.training:
            return z + torch.empty_like(z).uniform_(-0.5, 0.5)
        return torch.round(z).clamp(-Z_SUPPORT, Z_SUPPORT)

    def intra_likelihoods(self, y_tilde: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """(B, N) probabilities of everything an I-frame codes: the latent under the factorized prior (v1-v3), or
        the hyper-latent under its factorized prior and the latent under the Gaussian it gives (v4)."""
        if not self.cfg.hyper:
            return latent_likelihood(y_tilde, *self.prior(levels)).flatten(1)
        z_tilde = self.hyper_latent(y_tilde)
        mean, log_scale = self.h_s(z_tilde, y_tilde.shape[-2:])
        ly = gaussian_likelihood(y_tilde, mean, log_scale, LIKELIHOOD_FLOOR)
        lz = latent_likelihood(z_tilde, *self.z_prior(levels))
        return torch.cat([ly.flatten(1), lz.flatten(1)], 1)

    @torch.no_grad()
    def project_(self) -> None:
        """Back into the parameter set after an optimizer step (GDN's weights non-negative)."""
        for m in self.modules():
            if isinstance(m, GDN):
                m.project_()

    def forward_segment(self, x: torch.Tensor, levels: torch.Tensor, rule: PFrameRule = PFrameRule()) -> dict:
        """Training path for rows of consecutive frames x: (B, S, 3, H, W) coded as one group of pictures:
        frame 0 as an I-frame, the others as P-frames (rate under the temporal prior of the integer latent the
        encoder would code, around the previous one, as the coder will see it; straight-through gradient).
        ``rule`` is the encoder's P-frame quantization (:class:`PFrameRule`; rate–distortion optimisation
        measures each row's channel sensitivities on its own I-frame, as the encoder does per group), so the
        prior learns the statistics the coder will see. Returns x_hat (B, S, 3, H, W) and per-row bits (B,).

        Each module is called once: the transforms and gains on all B·S frames (rows b·S … b·S+S−1 belong
        to segment b), the priors on the B segments. Under DP-SGD the per-frame gradient samples are summed
        per segment by :func:`common.privacy.fold_segment_grad_samples` before clipping."""
        if not self.cfg.temporal:
            raise FedlvcError("this model has no temporal prior (intra-only architecture)")
        if self.cfg.motion:
            from .residual import forward_motion_segment

            return forward_motion_segment(self, x, levels, rule)
        b, frames = x.shape[:2]
        flat = x.reshape(b * frames, *x.shape[2:]).contiguous()  # not channels_last: see common.privacy
        y = self.analysis(flat, levels.repeat_interleave(frames))
        yv = y.reshape(b, frames, *y.shape[1:])
        raw = self.temporal(levels)
        groups = self.cfg.p_groups
        lam = torch.tensor(self.cfg.lambdas, dtype=y.dtype, device=y.device)[levels]
        weights = None
        # The latents the coder will hold (the encoder's P-frame rule; straight-through), with the motion
        # history each P-frame is coded under.
        targets, coded, histories, contexts = [], [], [None], [None]
        for s in range(frames):
            ys = yv[:, s]
            if s == 0:
                q = torch.round(ys.detach())
                if rule.uses_rd:
                    weights = synthesis_sensitivity(self, q, levels)
            else:
                if s >= 2:
                    histories.append(next_history(histories[-1], coded[s - 2], coded[s - 1]))
                found = []  # with RDO: the contexts the choice was made under, which code it
                q = choose_p_latent(
                    ys.detach(),
                    coded[-1],
                    histories[-1],
                    raw.detach(),
                    groups,
                    rule,
                    self.cfg.support,
                    lam,
                    weights,
                    found,
                )
                contexts.append(found[0] if found else p_context(coded[-1], histories[-1], q, groups))
            targets.append(ys + (q - ys).detach())
            coded.append(q)
        if self.training:
            y_tilde = y + torch.empty_like(y).uniform_(-0.5, 0.5)
        else:
            y_tilde = torch.stack(targets, 1).reshape(y.shape)
        x_hat = self.synthesis(y_tilde, levels.repeat_interleave(frames))
        first = y_tilde.reshape(b, frames, *y.shape[1:])[:, 0]
        bits = -torch.log2(self.intra_likelihoods(first, levels)).sum(1)
        for s in range(1, frames):
            bits = bits + PFrameCoder.training_bits(raw, targets[s], coded[s - 1], contexts[s])
        return {"x_hat": x_hat.reshape(b, frames, *x_hat.shape[1:]), "bits": bits}


def upgrade_temporal_table(v2_weight: torch.Tensor, cfg: CodecConfig) -> torch.Tensor:
    """A v2 temporal table (levels, C·TEMPORAL_CONTEXTS) as a v3 one (levels, C·p_contexts): each in-frame
    value of a context starts from the v2 value of that context."""
    n = v2_weight.shape[0]
    t = v2_weight.reshape(n, cfg.latent_channels, TEMPORAL_CONTEXTS, 1)
    return t.expand(-1, -1, -1, cfg.p_contexts // TEMPORAL_CONTEXTS).reshape(n, -1).clone()


def with_temporal_prior(model: FedlvcCodec) -> FedlvcCodec:
    """A model upgraded to the current architecture, same weights: an intra-only (v1) model gains a fresh
    temporal prior; a v2 temporal prior gains the in-frame contexts of v3, every in-frame value starting
    from the v2 scale of its context (so the upgraded model codes as the v2 one did until trained)."""
    if model.cfg.architecture in (ARCHITECTURE, ARCHITECTURE_V4):
        return model
    cfg = CodecConfig.from_dict(dict(model.cfg.to_dict(), architecture=ARCHITECTURE))
    new = FedlvcCodec(cfg)
    state = dict(model.state_dict())
    if model.cfg.temporal:
        state["temporal.table.weight"] = upgrade_temporal_table(state["temporal.table.weight"], cfg)
    missing, unexpected = new.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("temporal.") for k in missing), (missing, unexpected)
    return new.train(model.training)


def with_adapters(model: FedlvcCodec) -> FedlvcCodec:
    """The same model with FiLM adapters (identity at start: it codes exactly as before), for private
    fine-tuning of few parameters (``train-parts = adapters``)."""
    if model.cfg.adapters:
        return model
    new = FedlvcCodec(CodecConfig.from_dict(dict(model.cfg.to_dict(), adapters=True)))
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(".film." in k for k in missing), (missing, unexpected)
    return new.train(model.training)


def with_motion(model: FedlvcCodec) -> FedlvcCodec:
    """The same model with motion-compensated P-frames (``cfg.motion``): its residual codec starts as a copy of
    the intra transforms (without their convolutions' biases, and without adapters) and gains, its residual prior
    as a copy of the P-frame prior; everything else (and so every I-frame) is bit-identical. Train it on
    segments (``fedlvc train --motion``)."""
    if model.cfg.motion:
        return model
    model = with_temporal_prior(model)
    new = FedlvcCodec(CodecConfig.from_dict(dict(model.cfg.to_dict(), motion=True)))
    state = dict(model.state_dict())
    sources = {"res_g_a.": "g_a.", "res_g_s.": "g_s.", "res_gain.": "gain.", "res_inv_gain.": "inv_gain."}
    sources["res_prior."] = "temporal."
    for name in new.state_dict():
        for res, source in sources.items():
            if name.startswith(res):
                state[name] = state[source + name[len(res) :]].clone()
    new.load_state_dict(state, strict=True)
    if getattr(model, "_coding_tables", None) is not None:  # v4's integer tables: the same weights, the same tables
        new._coding_tables = model._coding_tables
    return new.train(model.training)
