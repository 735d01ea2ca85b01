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
from dataclasses import replace

import torch
from torch import nn

from common.errors import FedlvcError

from .architecture import ARCHITECTURE, ARCHITECTURE_V4, CodecConfig
from .hyperprior import GDN, Z_SUPPORT, AnalysisGDN, HyperAnalysis, HyperSynthesis, SynthesisGDN, gaussian_likelihood
from .priors import LIKELIHOOD_FLOOR, LevelPriorParams, latent_likelihood
from .temporal import TEMPORAL_CONTEXTS, TemporalPrior
from .transforms import AnalysisTransform, LevelGains, SynthesisTransform, without_biases


class FedlvcCodec(nn.Module):
    """The codec. ``forward(x, levels)`` is the training path of frames (of groups of pictures:
    :func:`common.train.segments.forward_segment`); coding lives in :mod:`common.codec`.

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
        if self.cfg.motion:  # the residual codec of motion-compensated P-frames (common.motion.residual), zero to zero
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
