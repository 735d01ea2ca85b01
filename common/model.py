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
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .errors import FedlvcError

ARCHITECTURE = "fedlvc-factorized-gain-v3"  # v2 plus contexts inside a P-frame (channel groups)
ARCHITECTURE_V2 = "fedlvc-factorized-gain-v2"  # v1 plus the temporal (P-frame) prior; still loads and decodes
ARCHITECTURE_INTRA = "fedlvc-factorized-gain-v1"  # intra-only models still load (and decode their streams)
ARCHITECTURES = (ARCHITECTURE, ARCHITECTURE_V2, ARCHITECTURE_INTRA)

# P-frame contexts (see temporal_context): 5 buckets of the previous latent's local gradient × 8 motion values:
# no history yet (the first P-frame of a group), 4 buckets of the last change in the 3×3 neighbourhood, or
# 3 buckets of how many frames the neighbourhood has been still.
GRADIENT_BOUNDS = (1, 2, 4, 8)
MOTION_BOUNDS = (2, 4, 8)  # a change of 1 | 2-3 | 4-7 | >= 8
STILL_BOUNDS = (2, 4)  # still for 1 | 2-3 | >= 4 frames
STILL_CAP = 255
NO_MOTION_HISTORY = 0
MOTION_VALUES = 1 + (len(MOTION_BOUNDS) + 1) + (len(STILL_BOUNDS) + 1)
TEMPORAL_CONTEXTS = (len(GRADIENT_BOUNDS) + 1) * MOTION_VALUES
MIN_LAPLACE_SCALE = 0.03

# Contexts inside a P-frame (architecture v3): the latent's channels are coded in P_GROUPS contiguous groups,
# one after the other; an element of a later group also sees how many elements of the earlier groups changed
# at its own position: 0 = none there nor in the 3x3 neighbourhood, 1 = none there but some next to it,
# 2.. = 1 | 2-3 | >= 4 changed there (IN_FRAME_BOUNDS). Elements of the first group always have value 0.
P_GROUPS = 4
IN_FRAME_BOUNDS = (2, 4)
IN_FRAME_VALUES = 2 + len(IN_FRAME_BOUNDS) + 1


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

    @property
    def num_levels(self) -> int:
        return len(self.lambdas)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lambdas"] = list(self.lambdas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CodecConfig":
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
    LIMITS = {"channels": (1, 512), "latent_channels": (1, 512), "mixtures": (1, 16), "support": (1, 1023)}
    MAX_LEVELS = 16

    def check_bounds(self) -> None:
        for key, (lo, hi) in self.LIMITS.items():
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise FedlvcError(f"model config {key} must be an integer in {lo}..{hi}, not {value!r}")
        if not 1 <= len(self.lambdas) <= self.MAX_LEVELS or not all(0 < v <= 10 for v in self.lambdas):
            raise FedlvcError(f"model config needs 1..{self.MAX_LEVELS} quality levels with lambdas in (0, 10], "
                              f"not {list(self.lambdas)!r}")
        if self.stride != 16:
            raise FedlvcError(f"model config stride must be 16 (four stride-2 stages), not {self.stride!r}")

    @property
    def temporal(self) -> bool:
        """Whether the model has a P-frame prior (can code groups of pictures longer than 1)."""
        return self.architecture in (ARCHITECTURE, ARCHITECTURE_V2)

    @property
    def p_groups(self) -> int:
        """Channel groups a P-frame latent is coded in (1: all at once, as architecture v2 does)."""
        return P_GROUPS if self.architecture == ARCHITECTURE else 1

    @property
    def p_contexts(self) -> int:
        """Contexts of the P-frame prior per (level, channel)."""
        return TEMPORAL_CONTEXTS * (IN_FRAME_VALUES if self.p_groups > 1 else 1)


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)


class AnalysisTransform(nn.Module):
    """g_a: RGB in [-½, ½] → latent y at 1/16 resolution."""

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        n, m = cfg.channels, cfg.latent_channels
        self.layers = nn.Sequential(
            _conv(3, n, 5, 2), nn.LeakyReLU(0.1),
            _conv(n, n, 5, 2), nn.LeakyReLU(0.1),
            _conv(n, n, 5, 2), nn.LeakyReLU(0.1),
            _conv(n, m, 5, 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class SynthesisTransform(nn.Module):
    """g_s: latent → RGB in [-½, ½] (before clamping), by 3×3 convs and PixelShuffle."""

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        n, m = cfg.channels, cfg.latent_channels
        self.layers = nn.Sequential(
            _conv(m, 4 * n, 3), nn.PixelShuffle(2), nn.LeakyReLU(0.1),
            _conv(n, 4 * n, 3), nn.PixelShuffle(2), nn.LeakyReLU(0.1),
            _conv(n, 4 * n, 3), nn.PixelShuffle(2), nn.LeakyReLU(0.1),
            _conv(n, 4 * 3, 3), nn.PixelShuffle(2),
        )

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.layers(y)


class LevelGains(nn.Module):
    """Per-level log-gain vectors: ``forward(levels)`` → gains of shape (B, C, 1, 1)."""

    def __init__(self, num_levels: int, channels: int, init: torch.Tensor):
        super().__init__()
        self.log_gain = nn.Embedding(num_levels, channels)
        with torch.no_grad():
            self.log_gain.weight.copy_(init[:, None].expand(num_levels, channels))

    def forward(self, levels: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.log_gain(levels))[:, :, None, None]


class LevelPriorParams(nn.Module):
    """Per-level, per-channel logistic-mixture parameters: ``forward(levels)`` → (logits, means, log_scales),
    each of shape (B, C, K). Kept as an Embedding so DP-SGD gives it per-sample gradients."""

    def __init__(self, num_levels: int, channels: int, mixtures: int):
        super().__init__()
        self.channels, self.mixtures = channels, mixtures
        self.table = nn.Embedding(num_levels, channels * mixtures * 3)
        with torch.no_grad():
            p = torch.zeros(num_levels, channels, mixtures, 3)
            p[..., 1] = torch.linspace(-1.0, 1.0, mixtures)  # spread the component means
            p[..., 2] = math.log(2.0)  # scales start at 2 quantization steps
            self.table.weight.copy_(p.reshape(num_levels, -1))

    def forward(self, levels: torch.Tensor):
        p = self.table(levels).view(-1, self.channels, self.mixtures, 3)
        return p[..., 0], p[..., 1], p[..., 2]


def mixture_cdf(x: torch.Tensor, logits: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """CDF of the logistic mixture at ``x`` (..., ) with parameters broadcast as (..., K)."""
    scales = 0.05 + F.softplus(log_scales)  # bounded below: no collapse to a spike
    weights = torch.softmax(logits, dim=-1)
    return (weights * torch.sigmoid((x[..., None] - means) / scales)).sum(-1)


LIKELIHOOD_FLOOR = 1e-9


def latent_likelihood(y: torch.Tensor, logits, means, log_scales) -> torch.Tensor:
    """p(ŷ) of each latent element under the discretised prior: CDF(ŷ+½) − CDF(ŷ−½).

    y: (B, C, H, W); parameters (B, C, K). Computed on the lower tail side for the upper half so that
    the difference of two CDFs close to 1 does not lose precision."""
    b, c = y.shape[:2]
    yf = y.reshape(b, c, -1)
    lg, mu, ls = (t[:, :, None, :] for t in (logits, means, log_scales))
    upper = mixture_cdf(yf + 0.5, lg, mu, ls)
    lower = mixture_cdf(yf - 0.5, lg, mu, ls)
    # For the mirrored tail use survival functions: 1-CDF(a) is the CDF of the negated mixture at -a.
    upper_s = mixture_cdf(-(yf - 0.5), lg, -mu, ls)
    lower_s = mixture_cdf(-(yf + 0.5), lg, -mu, ls)
    p = torch.where(yf > mu.mean(-1), upper_s - lower_s, upper - lower)
    return p.clamp_min(LIKELIHOOD_FLOOR).view_as(y)


class TemporalPrior(nn.Module):
    """Per-level, per-channel, per-context Laplace scales of a P-frame latent around the previous decoded
    latent: ``forward(levels)`` → raw scale parameters (B, C, contexts). An Embedding, so DP-SGD gives it
    per-sample gradients like the other priors."""

    def __init__(self, num_levels: int, channels: int, contexts: int = TEMPORAL_CONTEXTS):
        super().__init__()
        self.channels, self.contexts = channels, contexts
        self.table = nn.Embedding(num_levels, channels * contexts)
        with torch.no_grad():
            self.table.weight.fill_(0.0)  # softplus(0) + floor ≈ 0.72 quantization steps at start

    def forward(self, levels: torch.Tensor) -> torch.Tensor:
        return self.table(levels).view(-1, self.channels, self.contexts)


def laplace_scale(raw: torch.Tensor) -> torch.Tensor:
    return MIN_LAPLACE_SCALE + F.softplus(raw)


@dataclass
class MotionHistory:
    """What the P-frames of a group have shown so far, per latent element (float tensors (B, C, h, w) holding
    integers): ``change`` — the largest |ŷ_t − ŷ_{t−1}| of the last P-frame in the 3×3 neighbourhood;
    ``still`` — for how many frames in a row that neighbourhood has not changed (capped)."""

    change: torch.Tensor
    still: torch.Tensor


@torch.no_grad()
def next_history(history: MotionHistory | None, prev: torch.Tensor, current: torch.Tensor) -> MotionHistory:
    """The history after decoding P-frame latent ``current`` on top of ``prev`` (None: right after the I-frame)."""
    change = F.max_pool2d((current.float() - prev.float()).abs().contiguous(), 3, stride=1, padding=1)
    still = torch.zeros_like(change) if history is None else history.still
    still = torch.where(change > 0, torch.zeros_like(still), (still + 1).clamp_max(STILL_CAP))
    return MotionHistory(change, still)


@torch.no_grad()
def temporal_context(prev: torch.Tensor, history: MotionHistory | None) -> torch.Tensor:
    """Context index (B, C, h, w) int64 of every element of a P-frame latent, by integer arithmetic on the
    decoded latents only (so encoder and decoder agree exactly on any machine):

    * spatial activity of ``prev`` — the largest absolute difference to its 4 neighbours, bucketed by
      GRADIENT_BOUNDS (a moving edge changes the latent where it is not flat);
    * motion — NO_MOTION_HISTORY for the group's first P-frame; else, where the neighbourhood changed in
      the last frame, that change bucketed by MOTION_BOUNDS (1..4), and where it did not, for how long it has
      been still, bucketed by STILL_BOUNDS (5..7): a background still for many frames stays still."""
    p = prev.float().contiguous()
    padded = F.pad(p, (1, 1, 1, 1), mode="replicate")
    h, w = p.shape[-2:]
    grad = torch.zeros_like(p)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        grad = torch.maximum(grad, (padded[..., dy : dy + h, dx : dx + w] - p).abs())
    g = torch.bucketize(grad, torch.tensor(GRADIENT_BOUNDS, dtype=p.dtype, device=p.device), right=True)
    if history is None:
        m = torch.full_like(g, NO_MOTION_HISTORY)
    else:
        moved = 1 + torch.bucketize(history.change, torch.tensor(MOTION_BOUNDS, dtype=p.dtype, device=p.device),
                                    right=True)
        still = 1 + len(MOTION_BOUNDS) + 1 + torch.bucketize(
            history.still, torch.tensor(STILL_BOUNDS, dtype=p.dtype, device=p.device), right=True)
        m = torch.where(history.change > 0, moved, still)
    return g * MOTION_VALUES + m


def channel_groups(channels: int, groups: int) -> list[slice]:
    """The contiguous channel ranges a P-frame latent is coded in, in coding order."""
    bounds = [round(g * channels / groups) for g in range(groups + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


@torch.no_grad()
def in_frame_value(changed_before: torch.Tensor) -> torch.Tensor:
    """In-frame context value (B, 1, h, w) int64 from the count (B, 1, h, w) of changed elements of the
    earlier channel groups at each position (see IN_FRAME_BOUNDS); integer arithmetic only."""
    c = changed_before.float()
    near = F.max_pool2d((c > 0).float().contiguous(), 3, stride=1, padding=1).long()
    counted = 2 + torch.bucketize(c, torch.tensor(IN_FRAME_BOUNDS, dtype=c.dtype, device=c.device), right=True)
    return torch.where(c > 0, counted, near)


class PFrameContexts:
    """The contexts of one P-frame latent, channel group by channel group in coding order: ``of(g)`` gives
    group g's context indices (B, n_g, h, w) int64 once ``add`` has been told the values of the groups before
    it (an encoder knows them all; a decoder has just decoded them)."""

    def __init__(self, prev: torch.Tensor, history: MotionHistory | None, groups: int):
        self.prev, self.groups = prev, groups
        self.slices = channel_groups(prev.shape[1], groups)
        tctx = temporal_context(prev, history)
        self.base = tctx * IN_FRAME_VALUES if groups > 1 else tctx
        self.count = torch.zeros_like(prev[:, :1], dtype=torch.float32)

    @torch.no_grad()
    def of(self, g: int) -> torch.Tensor:
        sl = self.slices[g]
        return self.base[:, sl] + in_frame_value(self.count) if self.groups > 1 else self.base[:, sl]

    @torch.no_grad()
    def add(self, g: int, values: torch.Tensor) -> None:
        """Group g's chosen (or decoded) values (B, n_g, h, w)."""
        sl = self.slices[g]
        self.count = self.count + (values != self.prev[:, sl]).float().sum(1, keepdim=True)


@torch.no_grad()
def p_context(prev: torch.Tensor, history: MotionHistory | None, current: torch.Tensor | None,
              groups: int) -> torch.Tensor:
    """Context index (B, C, h, w) int64 of every element of a P-frame latent: :func:`temporal_context`
    alone (groups 1, architecture v2), or combined with the in-frame value of its channel group computed
    from ``current`` (only its earlier groups are read, so a decoder may pass a latent whose later groups
    are not decoded yet)."""
    contexts = PFrameContexts(prev, history, groups)
    if groups == 1:
        return contexts.base
    out = torch.empty_like(contexts.base)
    for g, sl in enumerate(contexts.slices):
        out[:, sl] = contexts.of(g)
        contexts.add(g, current[:, sl])
    return out


def laplace_likelihood(y: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """p(y) of integer-valued y under a Laplace(mean, scale) quantized to unit bins centred on integers."""
    a = (y - mean).abs()
    inner = 1.0 - 0.5 * (torch.exp(-(0.5 - a).clamp_min(0) / scale) + torch.exp(-(0.5 + a) / scale))
    outer = 0.5 * torch.exp(-(a - 0.5).clamp_min(0) / scale) * -torch.expm1(-1.0 / scale)
    return torch.where(a < 0.5, inner, outer).clamp_min(LIKELIHOOD_FLOOR)


def upgrade_temporal_table(v2_weight: torch.Tensor, cfg: CodecConfig) -> torch.Tensor:
    """A v2 temporal table (levels, C·TEMPORAL_CONTEXTS) as a v3 one (levels, C·p_contexts): each in-frame
    value of a context starts from the v2 value of that context."""
    n = v2_weight.shape[0]
    t = v2_weight.reshape(n, cfg.latent_channels, TEMPORAL_CONTEXTS, 1)
    return t.expand(-1, -1, -1, cfg.p_contexts // TEMPORAL_CONTEXTS).reshape(n, -1).clone()


def temporal_scales(raw: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """Laplace scale of every element: raw (B, C, K) gathered by ctx (B, C, h, w)."""
    b, c = ctx.shape[:2]
    picked = torch.gather(raw, 2, ctx.reshape(b, c, -1))
    return laplace_scale(picked).view_as(ctx)


@dataclass(frozen=True)
class PFrameRule:
    """How an encoder picks the integer latent of a P-frame; the decoder needs none of it.

    * ``rd_weight`` κ > 0: rate–distortion optimised quantization. Channel group by channel group (in coding
      order, so each group sees the in-frame contexts of the decisions before it), every element takes the
      value among {previous value, round(y), round(y) one step towards the previous value} that minimises
      ``κ·λ_q·255²/3 · w_c·(y − v)² + bits(v)``: the per-frame training loss ``λ_q·255²·MSE + bpp`` times
      the pixel count, with the distortion linearised per channel (``w_c``: squared error of the decoded
      frame, in [0, 1] units summed over RGB, per unit² of latent error, measured at the group's I-frame by
      :func:`synthesis_sensitivity`) and the rate under the temporal prior. A change that buys little
      quality (sensor noise, a channel the decoder hardly uses, a still background where a change is
      improbable) is not coded.
    * otherwise ``skip_threshold`` T: keep the previous value where |y − previous| < ½ + T, round elsewhere.
    """

    rd_weight: float = 0.0
    skip_threshold: float = 0.0

    @classmethod
    def of(cls, rd_weight: float, skip_threshold: float) -> "PFrameRule":
        """The rule of a config holding both settings: the skip threshold counts only without RDO."""
        return cls(rd_weight, 0.0 if rd_weight > 0 else skip_threshold)

    @property
    def uses_rd(self) -> bool:
        return self.rd_weight > 0


@torch.no_grad()
def _laplace_bits(zero: torch.Tensor, step: torch.Tensor, per_step: torch.Tensor,
                  distance: torch.Tensor) -> torch.Tensor:
    """−log2 p of an integer ``distance`` from the mean under the quantized Laplace of :func:`laplace_likelihood`
    (same floor), in closed form from its bits at distance 0 (``zero``: −log2(1 − e^(−½/s))), the constant
    part of the others (``step``: −log2(½·(1 − e^(−1/s)))) and ``per_step`` = 1/(s·ln 2)."""
    bits = torch.where(distance < 0.5, zero, step + (distance - 0.5) * per_step)
    return bits.clamp_max(-math.log2(LIKELIHOOD_FLOOR))


@torch.no_grad()
def choose_p_latent(y: torch.Tensor, prev: torch.Tensor, history: "MotionHistory | None", raw: torch.Tensor,
                    groups: int, rule: PFrameRule, support: int, lam: torch.Tensor | None = None,
                    weights: torch.Tensor | None = None, contexts_out: list | None = None) -> torch.Tensor:
    """The integer latent (B, C, h, w) (float) an encoder codes for the P-frame latent ``y`` on top of the
    previous decoded latent ``prev`` (see :class:`PFrameRule`). ``raw``: the temporal prior's raw scales
    (B, C, K); ``lam`` (B,) the λ of each row's level and ``weights`` (B, C) its channel sensitivities
    (both only for rate–distortion optimisation). With RDO, ``contexts_out`` (a list) receives the context
    indices (B, C, h, w) of the chosen latent — the ones it will be coded under."""
    r = torch.round(y).clamp(-support, support)
    if not rule.uses_rd:
        if rule.skip_threshold > 0:
            r = torch.where((y - prev).abs() < 0.5 + rule.skip_threshold, prev, r)
        return r
    towards = torch.where((r - prev).abs() >= 2, r - torch.sign(r - prev), r)
    dist = (rule.rd_weight * 255.0**2 / 3.0) * (lam[:, None] * weights)[:, :, None, None]
    # Per (row, channel, context): the bits of the previous value, the constant part of the bits of any
    # other value, and 1/(scale·ln 2) — tabulated once, gathered per element below.
    scale = laplace_scale(raw)
    tables = (-torch.log2(-torch.expm1(-0.5 / scale)), 1.0 - torch.log2(-torch.expm1(-1.0 / scale)),
              1.0 / (scale * math.log(2.0)))
    contexts = PFrameContexts(prev, history, groups)
    out = torch.empty_like(r)
    ctx_all = torch.empty_like(contexts.base) if contexts_out is not None else None
    for g, sl in enumerate(contexts.slices):
        ctx = contexts.of(g)
        if ctx_all is not None:
            ctx_all[:, sl] = ctx
        zero, step, per_step = (torch.gather(t[:, sl], 2, ctx.flatten(2)).view_as(ctx) for t in tables)
        ys, ps, d = y[:, sl], prev[:, sl], dist[:, sl]
        best, best_cost = ps, d * (ys - ps) ** 2 + zero.clamp_max(-math.log2(LIKELIHOOD_FLOOR))
        for cand in (r[:, sl], towards[:, sl]):
            cost = d * (ys - cand) ** 2 + _laplace_bits(zero, step, per_step, (cand - ps).abs())
            better = cost < best_cost
            best, best_cost = torch.where(better, cand, best), torch.where(better, cost, best_cost)
        out[:, sl] = best
        contexts.add(g, best)
    if contexts_out is not None:
        contexts_out.append(ctx_all)
    return out


def _hook_free(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``layers(x)`` with detached weights and without calling any module, so that no hook (Opacus' per-sample
    gradient capture) sees the pass."""
    for m in layers:
        if isinstance(m, nn.Conv2d):
            x = F.conv2d(x, m.weight.detach(), None if m.bias is None else m.bias.detach(), m.stride, m.padding)
        elif isinstance(m, nn.PixelShuffle):
            x = F.pixel_shuffle(x, m.upscale_factor)
        elif isinstance(m, nn.LeakyReLU):
            x = F.leaky_relu(x, m.negative_slope)
        else:
            raise TypeError(f"unexpected layer {m!r}")
    return x


def synthesis_sensitivity(model: "FedlvcCodec", y_hat: torch.Tensor, levels: torch.Tensor, probes: int = 1,
                          seed: int = 0) -> torch.Tensor:
    """(B, C) float32: for each row and latent channel, the mean over positions of the squared error of the
    decoded frame (RGB in [0, 1], summed over pixels and colours) per unit² change of one element of the
    scaled latent ``y_hat`` (B, C, h, w), i.e. the squared norm of that Jacobian column at ``y_hat``.
    Estimated with Hutchinson's trick — for a random ±1 vector r, E[(Jᵀr)²] is the squared column norm —
    so one backward pass serves every channel and position (``probes`` passes are averaged; the probes
    are fixed by ``seed`` and the same for every row). Runs the synthesis transform's layers without
    calling its modules, so Opacus' per-sample gradient hooks never see it. Used by the encoder's
    rate–distortion optimisation (on each group's I-frame), and by training, which models it on each row's
    own I-frame; the decoder never needs it."""
    inv_gain = torch.exp(model.inv_gain.log_gain.weight.detach()[levels])[:, :, None, None]
    gen = torch.Generator(device=y_hat.device).manual_seed(seed)
    with torch.enable_grad():
        y = y_hat.detach().float().clone().requires_grad_(True)
        x = _hook_free(model.g_s.layers, y * inv_gain)
        acc = torch.zeros(y.shape[:2], device=y.device)
        for p in range(probes):
            # One probe for every row: a row's estimate depends on that row alone, whatever the batch.
            r = (torch.randint(0, 2, (1, *x.shape[1:]), generator=gen, device=x.device).float() * 2 - 1).expand_as(x)
            (grad,) = torch.autograd.grad(x, y, grad_outputs=r, retain_graph=p < probes - 1)
            acc += grad.pow(2).mean((2, 3))
    return acc / probes


class FedlvcCodec(nn.Module):
    """The codec. ``forward(x, levels)`` is the training path; coding lives in :mod:`common.codec`.

    x: (B, 3, H, W) RGB in [0, 1] with H, W multiples of ``cfg.stride``; levels: (B,) int64 in [0, L).
    """

    def __init__(self, cfg: CodecConfig | None = None):
        super().__init__()
        self.cfg = cfg or CodecConfig()
        n = self.cfg.num_levels
        self.g_a = AnalysisTransform(self.cfg)
        self.g_s = SynthesisTransform(self.cfg)
        # Higher levels quantize more finely: gains from 0.5× to 2× of the middle level at start.
        init = torch.linspace(math.log(0.5), math.log(2.0), n)
        self.gain = LevelGains(n, self.cfg.latent_channels, init)
        self.inv_gain = LevelGains(n, self.cfg.latent_channels, -init)
        self.prior = LevelPriorParams(n, self.cfg.latent_channels, self.cfg.mixtures)
        if self.cfg.temporal:
            self.temporal = TemporalPrior(n, self.cfg.latent_channels, self.cfg.p_contexts)

    def check_level(self, level: int) -> None:
        if not 0 <= level < self.cfg.num_levels:
            raise FedlvcError(
                f"quality {level + 1} is out of range: this model has qualities 1..{self.cfg.num_levels}"
            )

    def analysis(self, x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """Scaled latent (before quantization) of frames in [0, 1]."""
        return self.g_a(x - 0.5) * self.gain(levels)

    def synthesis(self, y_hat: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """Frames in [0, 1] (unclamped) from quantized latents."""
        return self.g_s(y_hat * self.inv_gain(levels)) + 0.5

    def forward(self, x: torch.Tensor, levels: torch.Tensor) -> dict:
        y = self.analysis(x, levels)
        if self.training:
            y_tilde = y + torch.empty_like(y).uniform_(-0.5, 0.5)
        else:
            y_tilde = torch.round(y)
        x_hat = self.synthesis(y_tilde, levels)
        likelihood = latent_likelihood(y_tilde, *self.prior(levels))
        return {"x_hat": x_hat, "likelihoods": likelihood}

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
                q = choose_p_latent(ys.detach(), coded[-1], histories[-1], raw.detach(), groups, rule,
                                    self.cfg.support, lam, weights, found)
                contexts.append(found[0] if found else p_context(coded[-1], histories[-1], q, groups))
            targets.append(ys + (q - ys).detach())
            coded.append(q)
        if self.training:
            y_tilde = y + torch.empty_like(y).uniform_(-0.5, 0.5)
        else:
            y_tilde = torch.stack(targets, 1).reshape(y.shape)
        x_hat = self.synthesis(y_tilde, levels.repeat_interleave(frames))
        first = y_tilde.reshape(b, frames, *y.shape[1:])[:, 0]
        bits = -torch.log2(latent_likelihood(first, *self.prior(levels))).flatten(1).sum(1)
        for s in range(1, frames):
            prev = coded[s - 1]
            scales = temporal_scales(raw, contexts[s])
            bits = bits - torch.log2(laplace_likelihood(targets[s], prev, scales)).flatten(1).sum(1)
        return {"x_hat": x_hat.reshape(b, frames, *x_hat.shape[1:]), "bits": bits}


@dataclass
class SegmentRateDistortion:
    """Per-row loss of a segment ``λ_q·255²·MSE + bpp`` averaged over its frames (a vector over the batch)."""

    lambdas: tuple[float, ...]
    terms: dict = field(default_factory=dict)

    def __call__(self, out: dict, x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        b, s, _, h, w = x.shape
        mse = ((out["x_hat"] - x) ** 2).reshape(b, -1).mean(1)
        bpp = out["bits"] / (s * h * w)
        lam = torch.tensor(self.lambdas, dtype=x.dtype, device=x.device)[levels]
        self.terms = {"mse": mse.detach(), "bpp": bpp.detach()}
        return lam * 255.0**2 * mse + bpp


@dataclass
class RateDistortion:
    """Per-sample rate–distortion loss ``λ_q·255²·MSE + bpp`` (a vector over the batch)."""

    lambdas: tuple[float, ...]
    terms: dict = field(default_factory=dict)

    def __call__(self, out: dict, x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        mse = ((out["x_hat"] - x) ** 2).reshape(b, -1).mean(1)
        bpp = -torch.log2(out["likelihoods"]).reshape(b, -1).sum(1) / (h * w)
        lam = torch.tensor(self.lambdas, dtype=x.dtype, device=x.device)[levels]
        self.terms = {"mse": mse.detach(), "bpp": bpp.detach()}
        return lam * 255.0**2 * mse + bpp
