"""Architecture v4's parts: simplified GDN, the GDN transforms, and a mean-scale hyperprior (Ballé et al. 2018,
Minnen et al. 2018) whose decoder side runs in exact integer arithmetic when coding.

    x ─► g_a (conv + GDN) ─► y ─► ×gain[q] ─► round ─► ŷ (integers) ─► ×inv_gain[q] ─► g_s (conv + IGDN) ─► x̂
                                                         │
                                       h_a ─► z ─► round ─► ẑ  (coded under a per-level factorized prior)
                                                                │
                                      h_s (integer arithmetic when coding) ─► mean μ, log-scale of every ŷ

ŷ is coded under a Gaussian of mean μ and scale σ discretised on the integers, CDF(k+½−μ) − CDF(k−½−μ) (so the
coded latent stays an integer array and the P-frame coder of :mod:`common.coding.pframe` works on it unchanged).

Exactness: the coder picks one of :data:`SCALE_LEVELS` × :data:`MEAN_FRACS` integer tables
(:mod:`common.coding.hypercoder`) for each element from h_s's output. Float convolutions differ in their last bits
between CPU kernels (``ATEN_CPU_CAPABILITY``) and GPUs, and a table index that flips breaks the stream. So when
coding, h_s runs on integers: weights rounded to multiples of 2^-:data:`WEIGHT_BITS`, activations to multiples of
2^-:data:`ACT_BITS`, and each convolution is a float64 matrix product of integer-valued operands whose partial
sums stay below 2^53, exact in any summation order on any hardware. Rounding between layers is a floor of an
exact quotient by a power of two. Training uses the float path; the integer path differs from it by the
rounding of weights and activations (a few 1e-4 in the log-scale), which costs nothing measurable in rate.

Opacus: every parameter sits in a Conv2d (or the Embeddings of :mod:`common.net.transforms` and
:mod:`common.net.priors`), no buffers. GDN's weights must stay non-negative: :meth:`GDN.project_` after each
optimizer step; the forward pass also clamps the denominator, so a step that leaves the set (DP noise) cannot
divide by zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .architecture import CodecConfig
from .transforms import Adapted

GDN_FLOOR = 0.05  # lower bound of GDN's denominator (and of its bias after projection)

# The scales of the Gaussian conditional: σ_i = exp((SCALE_LOG0 + i·SCALE_LOG_STEP) / 2^ACT_BITS), i < SCALE_LEVELS
# (0.105 … 62.3, log-spaced). Integers, so that the table index is computed exactly from h_s's integer output.
ACT_BITS = 10
SCALE_LEVELS = 64
SCALE_LOG0 = -2305  # ln(0.105)·1024
SCALE_LOG_STEP = 103  # (ln(62.3) − ln(0.105))/63·1024
MEAN_FRACS = 8  # the fractional part of a mean is coded in eighths
WEIGHT_BITS = 14
MAX_ACT = 2**22  # |activation| in units of 2^-ACT_BITS (4096.0): partial sums stay far below 2^53
MAX_WEIGHT = 2**18  # |weight| in units of 2^-WEIGHT_BITS (16.0)
Z_SUPPORT = 63  # coded hyper-latents lie in [-Z_SUPPORT, Z_SUPPORT]


def scale_of_index(i: int) -> float:
    """σ of table index ``i``."""
    return math.exp((SCALE_LOG0 + i * SCALE_LOG_STEP) / 2**ACT_BITS)


LOG_SCALE_MIN = SCALE_LOG0 / 2**ACT_BITS
LOG_SCALE_MAX = (SCALE_LOG0 + (SCALE_LEVELS - 1) * SCALE_LOG_STEP) / 2**ACT_BITS


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)


class GDN(nn.Module):
    """Simplified generalized divisive normalization (Johnston et al. 2019): ``x / (β + Γ|x|)`` per position, or
    ``x · (β + Γ|x|)`` when ``inverse``; Γ (C×C, non-negative) and β (> 0) are a 1×1 Conv2d's weight and bias."""

    def __init__(self, channels: int, inverse: bool = False):
        super().__init__()
        self.inverse = inverse
        self.conv = nn.Conv2d(channels, channels, 1)
        with torch.no_grad():
            self.conv.weight.copy_(0.1 * torch.eye(channels)[:, :, None, None])
            self.conv.bias.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply(x, self.conv(x.abs()))

    def apply(self, x: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        norm = norm.clamp_min(GDN_FLOOR)
        return x * norm if self.inverse else x / norm

    def detached(self, x: torch.Tensor) -> torch.Tensor:
        """The forward pass with detached weights and without calling the Conv2d module (no hooks)."""
        return self.apply(x, F.conv2d(x.abs(), self.conv.weight.detach(), self.conv.bias.detach()))

    @torch.no_grad()
    def project_(self) -> None:
        self.conv.weight.clamp_(min=0.0)
        self.conv.bias.clamp_(min=GDN_FLOOR)


class AnalysisGDN(Adapted):
    """g_a of v4: four 5×5 stride-2 convolutions with GDN between them."""

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        n, m = cfg.channels, cfg.latent_channels
        self.layers = nn.Sequential(
            _conv(3, n, 5, 2), GDN(n), _conv(n, n, 5, 2), GDN(n), _conv(n, n, 5, 2), GDN(n), _conv(n, m, 5, 2)
        )
        self._add_adapters(cfg)


class SynthesisGDN(Adapted):
    """g_s of v4: 3×3 convolutions and PixelShuffle, with inverse GDN between them."""

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        n, m = cfg.channels, cfg.latent_channels
        layers = []
        for cin in (m, n, n):
            layers += [_conv(cin, 4 * n, 3), nn.PixelShuffle(2), GDN(n, inverse=True)]
        self.layers = nn.Sequential(*layers, _conv(n, 12, 3), nn.PixelShuffle(2))
        self._add_adapters(cfg)


class HyperAnalysis(nn.Module):
    """h_a: the scaled latent (B, M, h, w) → hyper-latent z (B, Z, ⌈h/4⌉, ⌈w/4⌉)."""

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        m, z = cfg.latent_channels, cfg.hyper_channels
        self.layers = nn.Sequential(_conv(m, z, 3), nn.ReLU(), _conv(z, z, 5, 2), nn.ReLU(), _conv(z, z, 5, 2))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.layers(y)


class HyperSynthesis(nn.Module):
    """h_s: ẑ → (mean, log-scale) of every latent element, (B, M, h, w) each. ``integer_forward`` is the exact
    path the coder uses."""

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        m, z = cfg.latent_channels, cfg.hyper_channels
        self.m = m
        self.layers = nn.Sequential(
            _conv(z, 4 * z, 3), nn.PixelShuffle(2), nn.ReLU(), _conv(z, 4 * z, 3), nn.PixelShuffle(2), nn.ReLU()
        )
        self.out = _conv(z, 2 * m, 3)

    def forward(self, z_hat: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.out(self.layers(z_hat))[:, :, : size[0], : size[1]]
        return p[:, : self.m], p[:, self.m :].clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)

    @torch.no_grad()
    def integer_layers(self) -> list[IntegerConv]:
        """The convolutions with integer weights (computed once per coder:
        :class:`common.coding.hypercoder.HyperCoder`)."""
        return [IntegerConv.of(m) for m in [*self.layers, self.out] if isinstance(m, nn.Conv2d)]

    @torch.no_grad()
    def integer_forward(
        self, z_hat: torch.Tensor, size: tuple[int, int], layers: list[IntegerConv] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log-scale) in units of 2^-ACT_BITS as float64 tensors holding integers, computed exactly.
        z_hat: (1, Z, h', w') integer-valued; ``layers``: :meth:`integer_layers` when already computed."""
        a = z_hat.double() * 2**ACT_BITS
        layers = layers if layers is not None else self.integer_layers()
        for i, conv in enumerate(layers):
            a = conv(a)
            if i < len(layers) - 1:
                a = F.pixel_shuffle(a, 2).clamp_min(0.0)  # ReLU commutes with the pixel shuffle
        a = a[:, :, : size[0], : size[1]]
        return a[:, : self.m], a[:, self.m :]


@dataclass(frozen=True)
class IntegerConv:
    """A convolution on integer activations (units of 2^-ACT_BITS): integer weights (units of 2^-WEIGHT_BITS),
    a float64 matrix product whose every partial sum is an integer below 2^53 (exact in any order), a floor
    by 2^WEIGHT_BITS."""

    weight: torch.Tensor  # (out, in·k·k) float64 holding integers
    bias: torch.Tensor  # (out, 1) float64 holding integers
    kernel: int
    padding: int

    @classmethod
    def of(cls, conv: nn.Conv2d) -> IntegerConv:
        w = torch.round(conv.weight.detach().double() * 2**WEIGHT_BITS).clamp(-MAX_WEIGHT, MAX_WEIGHT)
        b = torch.round(conv.bias.detach().double() * 2**ACT_BITS).clamp(-MAX_ACT, MAX_ACT)
        return cls(w.reshape(w.shape[0], -1), b[:, None], conv.kernel_size[0], conv.padding[0])

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        n, _, h, w = a.shape
        cols = F.unfold(a, self.kernel, padding=self.padding)  # (n, c·k·k, h·w): copies, no arithmetic
        acc = torch.matmul(self.weight, cols)  # |Σ| ≤ 2^22 · 2^18 · 9·512 < 2^53
        out = torch.floor(acc / 2**WEIGHT_BITS) + self.bias
        return out.clamp(-MAX_ACT, MAX_ACT).reshape(n, self.weight.shape[0], h, w)


def table_index(mean_q: torch.Tensor, log_scale_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(table index, integer offset) of every element from h_s's integer output: the table is
    ``scale index · MEAN_FRACS + eighth of the mean's fractional part``; the offset is ⌊mean⌋."""
    idx = torch.floor((log_scale_q - SCALE_LOG0 + SCALE_LOG_STEP // 2) / SCALE_LOG_STEP).clamp(0, SCALE_LEVELS - 1)
    offset = torch.floor(mean_q / 2**ACT_BITS)
    frac = torch.floor((mean_q - offset * 2**ACT_BITS) * MEAN_FRACS / 2**ACT_BITS)
    return (idx * MEAN_FRACS + frac).long(), offset.long()


def gaussian_likelihood(y: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor, floor: float) -> torch.Tensor:
    """p(y) of (integer or noisy) y under a Gaussian(mean, exp(log_scale)) discretised on unit bins centred on the
    integers, computed on the lower tail (no cancellation far from the mean)."""
    scale = torch.exp(log_scale)
    a = (y - mean).abs()
    upper = torch.special.ndtr((0.5 - a) / scale)
    lower = torch.special.ndtr((-0.5 - a) / scale)
    return (upper - lower).clamp_min(floor)
