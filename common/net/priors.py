"""The factorized prior of an I-frame latent, per quality level: a logistic mixture per channel, discretised as
CDF(k+½) − CDF(k−½). An Embedding looked up by the level, so DP-SGD gives it per-sample gradients; the coder's
tables are built from it (:mod:`common.coding.entropy`). The P-frame prior is :mod:`common.net.temporal`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


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


def mixture_pmf(logits: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor, r: int) -> torch.Tensor:
    """(C, 2r+1) float64 probabilities of the symbols −r…r under each channel's discretised mixture (parameters
    (C, K), float64): CDF(k+½) − CDF(k−½), the tails folded into the end symbols (not renormalised)."""
    edges = torch.arange(-r - 0.5, r + 1.0, 1.0, dtype=torch.float64)  # 2r+2 bin edges
    cdf = mixture_cdf(edges[None, :], logits[:, None, :], means[:, None, :], log_scales[:, None, :])
    cdf[:, 0], cdf[:, -1] = 0.0, 1.0
    return torch.diff(cdf, dim=1).clamp_min(0.0)


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
