"""The analysis and synthesis transforms and the per-level quantization gains of the codec (Ballé et al. 2017;
Cui et al. 2021's gain vectors). Only Conv2d and Embedding hold parameters: Opacus has per-sample gradient
samplers for both."""

from __future__ import annotations

import torch
from torch import nn

from .architecture import CodecConfig


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)


class FiLM(nn.Conv2d):
    """A per-channel scale and shift (a depthwise 1×1 convolution, identity at start): the adapters a site can
    fine-tune privately with few parameters (``train-parts = adapters``). A Conv2d, so Opacus samples it."""

    def __init__(self, channels: int):
        super().__init__(channels, channels, 1, groups=channels)
        with torch.no_grad():
            self.weight.fill_(1.0)
            self.bias.zero_()


class Adapted(nn.Module):
    """A transform: ``layers`` in order, with (``cfg.adapters``) a :class:`FiLM` after each convolution but the
    last, kept apart in ``film`` so that the layers' names (and older checkpoints) stay as they are."""

    def _add_adapters(self, cfg: CodecConfig) -> None:
        convs = [i for i, m in enumerate(self.layers) if isinstance(m, nn.Conv2d)][:-1]
        self.film = nn.ModuleDict({str(i): FiLM(self.layers[i].out_channels) for i in convs}) if cfg.adapters else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if self.film is not None and str(i) in self.film:
                x = self.film[str(i)](x)
        return x


class AnalysisTransform(Adapted):
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
        self._add_adapters(cfg)


class SynthesisTransform(Adapted):
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
        self._add_adapters(cfg)


def without_biases(transform: Adapted) -> Adapted:
    """``transform`` with the biases of its convolutions removed (a GDN's β stays): it then maps zero to exactly
    zero — what a motion model's residual codec needs, so that a perfect prediction costs the zero latent and
    decodes to the prediction itself, with no offset creeping into the frames of a group."""
    for m in transform.layers:
        if isinstance(m, nn.Conv2d) and m.bias is not None:
            m.register_parameter("bias", None)
    return transform


class LevelGains(nn.Module):
    """Per-level log-gain vectors: ``forward(levels)`` → gains of shape (B, C, 1, 1)."""

    def __init__(self, num_levels: int, channels: int, init: torch.Tensor):
        super().__init__()
        self.log_gain = nn.Embedding(num_levels, channels)
        with torch.no_grad():
            self.log_gain.weight.copy_(init[:, None].expand(num_levels, channels))

    def forward(self, levels: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.log_gain(levels))[:, :, None, None]
