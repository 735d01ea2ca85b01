"""PSNR-RGB, MS-SSIM and BD-rate."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.data.clips import generate_site_clip
from common.eval.metrics import PSNR_CAP, bd_rate, ms_ssim, psnr_rgb


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    """3 natural-ish frames, 176x144 (the size of the real camera clips)."""
    return np.stack(list(generate_site_clip(2, 1, 176, 144, 3)))


def noisy(frames: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(frames + rng.normal(0, sigma, frames.shape), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------- PSNR


def test_psnr_identical_is_the_cap(clip):
    assert psnr_rgb(clip, clip.copy()) == PSNR_CAP == 100.0
    assert psnr_rgb(clip[0], clip[0]) == 100.0


def test_psnr_of_a_constant_offset_of_one():
    a = np.full((2, 9, 7, 3), 100, np.uint8)
    expected = 10 * math.log10(255.0**2)  # MSE = 1
    assert psnr_rgb(a, a + 1) == pytest.approx(48.1308, abs=1e-4)
    assert psnr_rgb(a, a + 1) == pytest.approx(expected, rel=1e-12)
    assert psnr_rgb(a + 1, a) == pytest.approx(expected, rel=1e-12)  # symmetric, no uint8 wrap-around


def test_psnr_no_uint8_wraparound():
    a = np.zeros((4, 4, 3), np.uint8)
    b = np.full((4, 4, 3), 255, np.uint8)
    assert psnr_rgb(a, b) == pytest.approx(0.0, abs=1e-12)  # MSE = 255²


def test_psnr_known_value_and_per_frame_average():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    b[0] += 2  # frame 0: MSE 4
    b[1] += 4  # frame 1: MSE 16
    expected = np.mean([10 * math.log10(255.0**2 / 4), 10 * math.log10(255.0**2 / 16)])
    assert psnr_rgb(a, b) == pytest.approx(expected, rel=1e-12)
    # One identical frame counts as the cap, not as infinity.
    b[1] = 0
    assert psnr_rgb(a, b) == pytest.approx((10 * math.log10(255.0**2 / 4) + 100) / 2)


def test_psnr_decreases_with_noise(clip):
    assert psnr_rgb(clip, noisy(clip, 2)) > psnr_rgb(clip, noisy(clip, 8)) > psnr_rgb(clip, noisy(clip, 30))


def test_psnr_shape_mismatch():
    with pytest.raises(ValueError):
        psnr_rgb(np.zeros((2, 4, 4, 3), np.uint8), np.zeros((2, 4, 5, 3), np.uint8))


# ---------------------------------------------------------------------------------------------- MS-SSIM


def test_ms_ssim_identical_is_one(clip):
    assert ms_ssim(clip, clip.copy()) == pytest.approx(1.0, abs=1e-12)


def test_ms_ssim_decreases_with_noise(clip):
    values = [ms_ssim(clip, noisy(clip, s)) for s in (1, 4, 12, 40)]
    assert all(0 < v < 1 for v in values), values
    assert values == sorted(values, reverse=True), values
    assert values[0] > 0.99 and values[-1] < 0.9


def test_ms_ssim_works_at_144_pixels_high(clip):
    """144 px is too small for five scales (needs 176): fewer scales, still a sensible value."""
    assert clip.shape[1:3] == (144, 176)
    v = ms_ssim(clip, noisy(clip, 6))
    assert 0.8 < v < 1.0
    tall = np.ascontiguousarray(clip.transpose(0, 2, 1, 3))  # 176 high, 144 wide
    assert ms_ssim(tall, tall) == pytest.approx(1.0)
    small = clip[:, :40, :50]
    assert 0 < ms_ssim(small, noisy(small, 6)) < 1


def test_ms_ssim_single_scale_matches_scikit_image_ssim(clip):
    """Below 22 pixels there is one scale: plain SSIM (Gaussian σ=1.5, 11×11, population covariance)."""
    from skimage.metrics import structural_similarity

    a = clip[0, 50:70, 60:80]
    b = noisy(a, 8)
    ref = np.mean(
        [
            structural_similarity(
                a[..., c], b[..., c], gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255
            )
            for c in range(3)
        ]
    )
    assert ms_ssim(a, b) == pytest.approx(ref, rel=1e-9)


def test_ms_ssim_refuses_tiny_frames():
    a = np.zeros((1, 10, 40, 3), np.uint8)
    with pytest.raises(ValueError):
        ms_ssim(a, a)


# ---------------------------------------------------------------------------------------------- BD-rate

CURVE = [(0.1, 30.0), (0.2, 33.0), (0.4, 36.0), (0.8, 39.0)]


def test_bd_rate_of_a_curve_against_itself_is_zero():
    assert bd_rate(CURVE, CURVE) == pytest.approx(0.0, abs=1e-9)
    assert bd_rate(CURVE, list(reversed(CURVE))) == pytest.approx(0.0, abs=1e-9)  # order does not matter


def test_bd_rate_of_half_the_rate_is_minus_fifty_percent():
    half = [(r / 2, p) for r, p in CURVE]
    assert bd_rate(CURVE, half) == pytest.approx(-50.0, abs=1e-6)
    assert bd_rate(half, CURVE) == pytest.approx(100.0, abs=1e-6)
    double = [(r * 2, p) for r, p in CURVE]
    assert bd_rate(CURVE, double) == pytest.approx(100.0, abs=1e-6)


def test_bd_rate_with_partial_overlap_uses_the_common_range():
    shifted = [(r * 0.8, p + 1.5) for r, p in CURVE]  # 20 % less rate at every PSNR of shifted's range...
    v = bd_rate(CURVE, shifted)
    assert v is not None and v < 0
    # ...but a better PSNR at the same rate means fewer bits: BD-rate < 0 and not absurd.
    assert -80 < v < 0


def test_bd_rate_none_without_overlap():
    far = [(r, p + 20) for r, p in CURVE]
    assert bd_rate(CURVE, far) is None
    touching = [(r, p + 9) for r, p in CURVE]  # 39..48 vs 30..39: one point in common, no range
    assert bd_rate(CURVE, touching) is None
    assert bd_rate(CURVE, CURVE[:1]) is None
    assert bd_rate([], CURVE) is None


def test_bd_rate_ignores_unusable_points():
    noisy_curve = CURVE + [(0.0, 25.0), (0.3, float("nan")), (-1.0, 40.0)]
    assert bd_rate(CURVE, noisy_curve) == pytest.approx(0.0, abs=1e-9)


def test_bd_rate_matches_the_bjontegaard_package():
    """Our BD-rate (PCHIP, exact integrals) against the reference implementation on random curves, so that
    published figures compare with other codecs' BD-rates."""
    import bjontegaard

    rng = np.random.default_rng(0)
    for _ in range(20):
        rate_a = np.sort(rng.uniform(0.05, 1.5, 6))
        psnr_a = np.sort(rng.uniform(26, 38, 6))
        rate_t = np.sort(rate_a * rng.uniform(0.6, 1.4, 6))
        psnr_t = np.sort(psnr_a + rng.uniform(-1, 1, 6))
        reference = bjontegaard.bd_rate(rate_a, psnr_a, rate_t, psnr_t, method="pchip", require_matching_points=False)
        assert bd_rate(list(zip(rate_a, psnr_a)), list(zip(rate_t, psnr_t))) == pytest.approx(reference, abs=1e-6)
