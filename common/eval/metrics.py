"""Quality metrics on decoded frames, shared by fedlvc and the baselines: PSNR-RGB, MS-SSIM, BD-rate.

Frames are uint8 RGB (T, H, W, 3); metrics are computed per frame on [0, 255] and averaged over frames.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

PSNR_CAP = 100.0  # dB for identical frames


def psnr_rgb(ref: np.ndarray, test: np.ndarray) -> float:
    """Mean over frames of 10·log10(255² / MSE) with the MSE over all pixels and the three channels."""
    if ref.shape != test.shape:
        raise ValueError(f"shape mismatch {ref.shape} vs {test.shape}")
    ref4, test4 = ref.reshape((-1,) + ref.shape[-3:]), test.reshape((-1,) + test.shape[-3:])
    values = []
    for a, b in zip(ref4, test4):
        mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
        values.append(PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * math.log10(255.0**2 / mse)))
    return float(np.mean(values))


MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang, Simoncelli, Bovik 2003


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _ssim_terms(x: torch.Tensor, y: torch.Tensor, window: torch.Tensor):
    """Mean SSIM and contrast-structure term per image of (N, C, H, W) float64 in [0, 255] (valid filtering)."""
    c = x.shape[1]
    k1, k2, data_range = 0.01, 0.03, 255.0
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    wh = window.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    wv = window.view(1, 1, -1, 1).repeat(c, 1, 1, 1)

    def blur(t):
        return F.conv2d(F.conv2d(t, wh, groups=c), wv, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x**2
    syy = blur(y * y) - mu_y**2
    sxy = blur(x * y) - mu_x * mu_y
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    ssim = ((2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)) * cs
    return ssim.flatten(2).mean(-1), cs.flatten(2).mean(-1)


def ms_ssim(ref: np.ndarray, test: np.ndarray) -> float:
    """Multi-scale SSIM (Wang et al. 2003), 11×11 Gaussian window σ = 1.5, on RGB [0, 255], averaged over
    channels and frames. Frames too small for five scales use as many scales as fit (≥ 11 pixels at the
    coarsest), with the standard weights of those scales renormalised to sum to one."""
    # Contiguous NCHW: a permuted view sends the grouped convolutions down a slow path.
    x = torch.from_numpy(ref.reshape((-1,) + ref.shape[-3:])).permute(0, 3, 1, 2).double().contiguous()
    y = torch.from_numpy(test.reshape((-1,) + test.shape[-3:])).permute(0, 3, 1, 2).double().contiguous()
    window = _gaussian_window()
    side = min(x.shape[-2:])
    scales = max(1, min(len(MS_SSIM_WEIGHTS), int(math.floor(math.log2(side / 11))) + 1))
    if side < 11:
        raise ValueError("frames must be at least 11 pixels on each side for MS-SSIM")
    w = torch.tensor(MS_SSIM_WEIGHTS[:scales], dtype=torch.float64)
    w = w / w.sum()
    values = []
    for s in range(scales):
        ssim, cs = _ssim_terms(x, y, window)
        values.append(torch.relu(ssim if s == scales - 1 else cs))
        if s < scales - 1:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    stacked = torch.stack(values, dim=0)  # (scales, N, C)
    result = torch.prod(stacked ** w.view(-1, 1, 1), dim=0)
    return float(result.mean())


def increasing_curve(pairs) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) pairs sorted by x with later duplicates of an x dropped: the strictly increasing abscissa
    PCHIP interpolation needs."""
    xs, ys = [], []
    for x, y in sorted(pairs):
        if xs and x <= xs[-1]:
            continue
        xs.append(x)
        ys.append(y)
    return np.array(xs, float), np.array(ys, float)


def bd_rate(anchor: list[tuple[float, float]], test: list[tuple[float, float]]) -> float | None:
    """Bjøntegaard delta rate in % of ``test`` against ``anchor``, each a list of (bpp, psnr) points:
    the average difference of log-rate over the overlapping PSNR range, with monotone piecewise cubic
    (PCHIP) interpolation. Negative means ``test`` needs fewer bits. None when the curves do not overlap."""
    from scipy.interpolate import PchipInterpolator

    def curve(points):
        return increasing_curve((p, math.log(r)) for r, p in points if r > 0 and math.isfinite(p))

    pa, ra = curve(anchor)
    pt, rt = curve(test)
    if len(pa) < 2 or len(pt) < 2:
        return None
    lo, hi = max(pa[0], pt[0]), min(pa[-1], pt[-1])
    if hi <= lo:
        return None
    # The integral of each piecewise cubic is exact (it matches the bjontegaard package's PCHIP BD-rate;
    # tests/test_metrics.py); a 200-point trapezoid rule before was off by up to ~0.1 points.
    area = PchipInterpolator(pt, rt).integrate(lo, hi) - PchipInterpolator(pa, ra).integrate(lo, hi)
    return float((math.exp(area / (hi - lo)) - 1) * 100)
