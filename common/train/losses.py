"""Rate–distortion losses: per sample (a vector over the batch, which DP-SGD needs), ``λ_q·255²·MSE + bpp``."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
