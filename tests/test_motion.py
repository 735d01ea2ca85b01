"""Block motion (common.motion.blocks): the prediction is exact integer arithmetic (so encoder and decoder agree on any
machine), the vector predictor inverts, and the bounded search finds known motion on real camera content."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.data.video import read_frames
from common.motion.blocks import (
    BLOCK,
    MAX_MV,
    MV_UNIT,
    block_grid,
    estimate,
    median_predictor,
    predict,
    search_lambda,
    vectors_from_differences,
)


def _random_frame(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _field(h: int, w: int, dy: int, dx: int) -> torch.Tensor:
    hb, wb = block_grid(h, w)
    return torch.tensor([dy, dx], dtype=torch.int64).expand(hb, wb, 2).contiguous()


def test_whole_pixel_vectors_copy_the_reference_with_its_edges_extended():
    ref = _random_frame(48, 64)
    assert torch.equal(predict(ref, _field(48, 64, 0, 0)), ref)
    right = predict(ref, _field(48, 64, 0, 3 * MV_UNIT))  # content 3 pixels to the right comes in
    assert torch.equal(right[:, :-3], ref[:, 3:])
    assert torch.equal(right[:, -3:], ref[:, -1:].expand(-1, 3, -1))
    up = predict(ref, _field(48, 64, -2 * MV_UNIT, 0))
    assert torch.equal(up[2:], ref[:-2]) and torch.equal(up[:2], ref[:1].expand(2, -1, -1))


def test_quarter_pel_prediction_is_the_rounded_bilinear_formula():
    ref = _random_frame(32, 32, 1)
    out = predict(ref, _field(32, 32, 1, 2))  # a quarter pixel down, half a pixel right
    r = ref.to(torch.int64)
    a, b, c, d = r[:-1, :-1], r[:-1, 1:], r[1:, :-1], r[1:, 1:]
    expected = (3 * 2 * a + 3 * 2 * b + 1 * 2 * c + 1 * 2 * d + 8) >> 4
    assert torch.equal(out[:-1, :-1].to(torch.int64), expected)
    # and within rounding of a float bilinear interpolation
    exact = 0.75 * (0.5 * a + 0.5 * b) + 0.25 * (0.5 * c + 0.5 * d)
    assert (out[:-1, :-1].double() - exact.double()).abs().max() <= 0.5


def test_each_block_moves_by_its_own_vector():
    ref = _random_frame(32, 48, 2)
    mv = torch.zeros(2, 3, 2, dtype=torch.int64)
    mv[1, 2] = torch.tensor([-4, 8])  # only the bottom-right block: up 1, right 2 pixels
    out = predict(ref, mv)
    assert torch.equal(out[:BLOCK], ref[:BLOCK]) and torch.equal(out[:, : 2 * BLOCK], ref[:, : 2 * BLOCK])
    assert torch.equal(out[BLOCK:, 2 * BLOCK : -2], ref[BLOCK - 1 : -1, 2 * BLOCK + 2 :])


def test_prediction_is_integer_arithmetic_whatever_the_vectors():
    ref = _random_frame(64, 80, 3)
    mv = torch.from_numpy(np.random.default_rng(4).integers(-MAX_MV, MAX_MV + 1, (4, 5, 2)))
    out = predict(ref, mv)
    assert out.dtype == torch.uint8 and out.shape == ref.shape
    assert torch.equal(out, predict(ref.clone(), mv.clone()))  # deterministic; no float anywhere to differ


def test_vectors_rebuild_from_their_differences_to_the_median_predictor():
    for seed, (hb, wb) in enumerate([(1, 1), (1, 5), (4, 1), (5, 7)]):
        mv = torch.from_numpy(np.random.default_rng(seed).integers(-60, 61, (hb, wb, 2)))
        diff = (mv - median_predictor(mv)).numpy()
        assert np.array_equal(vectors_from_differences(diff), mv.numpy())
    uniform = _field(48, 64, 5, -7)  # a pan: every block after the first is predicted exactly
    diff = (uniform - median_predictor(uniform)).numpy()
    assert np.count_nonzero(diff.any(-1)) == 1 and diff[0, 0].tolist() == [5, -7]


def test_frame_sides_must_be_whole_blocks():
    with pytest.raises(ValueError, match="multiples of 16"):
        block_grid(40, 64)


def test_the_search_finds_a_sub_pixel_pan_on_real_camera_video(carphone_path):
    """Carphone's first frame (real camera), panned by (1.25, -2.25) pixels with the coder's own interpolation:
    the search, bounded as it is, finds that vector for the textured blocks, and its prediction is as close to
    the frame as the true vector's."""
    big = torch.from_numpy(np.ascontiguousarray(read_frames(carphone_path, 1)[0]))  # 144 x 176
    true = _field(144, 176, 5, -9)
    panned = predict(big, true)
    ref, cur = big[16:128, 16:160].contiguous(), panned[16:128, 16:160].contiguous()  # the same view, 112 x 144
    mv = estimate(cur, ref, search_lambda(0.013))
    interior = mv[1:-1, 1:-1].reshape(-1, 2)
    found = (interior == torch.tensor([5, -9])).all(1).float().mean()
    assert found >= 0.8, mv
    err = (predict(ref, mv).int() - cur.int()).abs()[BLOCK:-BLOCK, BLOCK:-BLOCK].float().mean()
    true_err = (predict(ref, _field(112, 144, 5, -9)).int() - cur.int()).abs()[BLOCK:-BLOCK, BLOCK:-BLOCK]
    assert err <= true_err.float().mean() + 0.5


def test_the_search_keeps_a_still_scene_still():
    ref = _random_frame(48, 64, 5)
    assert torch.equal(estimate(ref, ref, search_lambda(0.013)), torch.zeros(3, 4, 2, dtype=torch.int64))
