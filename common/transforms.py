"""The analysis and synthesis transforms and the per-level quantization gains of the codec (Ballé et al. 2017;
Cui et al. 2021's gain vectors). Only Conv2d and Embedding hold parameters: Opacus has per-sample gradient
samplers for both."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .model import CodecConfig


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)


class AnalysisTransform(nn.Module):
    """g_a: RGB in [-½, ½] → latent y at 1/16 resolution."""

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        n, m = cfg.channels, cfg.latent_channels
        self.layers = nn.Sequential(
            _conv(3, n, 5, 2),
            nn.LeakyReLU(0.1),
            _conv(n, n, 5, 2),
            nn.LeakyReLU(0.1),
            _conv(n, n, 5, 2),
            nn.LeakyReLU(0.1),
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
            _conv(m, 4 * n, 3),
            nn.PixelShuffle(2),
            nn.LeakyReLU(0.1),
            _conv(n, 4 * n, 3),
            nn.PixelShuffle(2),
            nn.LeakyReLU(0.1),
            _conv(n, 4 * n, 3),
            nn.PixelShuffle(2),
            nn.LeakyReLU(0.1),
            _conv(n, 4 * 3, 3),
            nn.PixelShuffle(2),
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
