"""Block motion: estimation at the encoder, motion-compensated prediction at both ends.

One vector per ``BLOCK``×``BLOCK`` block of the (padded) frame — 16×16 pixels, one latent position — in
quarter-pel units (``MV_UNIT`` per pixel), ``|component| ≤ MAX_MV``. The prediction samples the previous
*decoded* frame (uint8) at each pixel's position plus its block's vector, bilinearly between the four nearest
pixels with weights in sixteenths, in integer arithmetic, positions clamped to the frame (edge extension): the
same integers on every machine, so encoder and decoder build the same prediction from the same decoded frame.

The encoder's search (:func:`estimate`) is bounded: a full search of ±``COARSE_RADIUS`` on a 4×-downsampled
pair of frames (±32 pixels), an integer refinement at half and full resolution, then half- and quarter-pel
refinement; each candidate is scored by its sum of absolute differences plus ``lam`` times an estimate of the
vector's bits (a bias towards the vector its neighbours predict, so that still and smoothly moving regions cost
almost nothing to describe).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

BLOCK = 16  # pixels per block side: one vector per latent position (the transforms' stride)
MV_UNIT = 4  # quarter-pel
MAX_MV = 48 * MV_UNIT  # |component| of a vector, quarter-pels: ±48 pixels
COARSE_RADIUS = 8  # full search at 1/4 resolution: ±32 pixels


def block_grid(height: int, width: int) -> tuple[int, int]:
    """(rows, columns) of blocks of a padded frame (its sides are multiples of BLOCK)."""
    if height % BLOCK or width % BLOCK:
        raise ValueError(f"frame sides must be multiples of {BLOCK}, not {width}x{height}")
    return height // BLOCK, width // BLOCK


def _per_pixel(mv: torch.Tensor, scale: int = BLOCK) -> torch.Tensor:
    """(hb, wb, 2) → (hb·scale, wb·scale, 2): each block's vector at each of its pixels."""
    return mv.repeat_interleave(scale, 0).repeat_interleave(scale, 1)


def predict(ref: torch.Tensor, mv: torch.Tensor) -> torch.Tensor:
    """Motion-compensated prediction (H, W, C) uint8 from the reference frame ``ref`` (H, W, C) uint8 and the
    block vectors ``mv`` (H/BLOCK, W/BLOCK, 2) int (dy, dx) in quarter-pels: pixel (y, x) of block b takes the
    reference at (y + dy_b/4, x + dx_b/4), bilinearly, ``(Σ w·p + 8) >> 4`` with integer weights w summing to 16.
    Integer arithmetic only: exact on any machine."""
    h, w, c = ref.shape
    field = _per_pixel(mv.to(torch.int32))
    ys = torch.arange(h, dtype=torch.int32)[:, None] * MV_UNIT + field[..., 0]
    xs = torch.arange(w, dtype=torch.int32)[None, :] * MV_UNIT + field[..., 1]
    y0, fy = torch.div(ys, MV_UNIT, rounding_mode="floor"), (ys % MV_UNIT)[..., None]
    x0, fx = torch.div(xs, MV_UNIT, rounding_mode="floor"), (xs % MV_UNIT)[..., None]
    flat = ref.reshape(h * w, c).to(torch.int32)
    rows = [(y0 + d).clamp(0, h - 1) * w for d in (0, 1)]
    cols = [(x0 + d).clamp(0, w - 1) for d in (0, 1)]

    def at(i: int, j: int) -> torch.Tensor:
        return flat[(rows[i] + cols[j]).reshape(-1)].reshape(h, w, c)

    top = at(0, 0) * (MV_UNIT - fx) + at(0, 1) * fx
    bottom = at(1, 0) * (MV_UNIT - fx) + at(1, 1) * fx
    return ((top * (MV_UNIT - fy) + bottom * fy + MV_UNIT**2 // 2) >> 4).to(torch.uint8)


def median_predictor(mv: torch.Tensor) -> torch.Tensor:
    """(hb, wb, 2) int64: each block's predicted vector from its causal neighbours in raster order — the
    component-wise median of left, top and top-right (top-left in the last column), a missing neighbour counting
    as the zero vector; the first row predicts from its left neighbour alone."""
    mv = mv.to(torch.int64)
    left, top, corner = (torch.zeros_like(mv) for _ in range(3))
    left[:, 1:], top[1:] = mv[:, :-1], mv[:-1]
    corner[1:, :-1] = mv[:-1, 1:]
    if mv.shape[1] > 1:
        corner[1:, -1] = mv[:-1, -2]
    med = torch.stack([left, top, corner]).median(0).values
    med[0] = left[0]
    return med


def vectors_from_differences(diff: np.ndarray) -> np.ndarray:
    """Inverse of ``mv - median_predictor(mv)`` (what a decoder has): block by block in raster order."""
    hb, wb = diff.shape[:2]
    mv = np.zeros_like(diff, dtype=np.int64)
    zero = np.zeros(2, dtype=np.int64)
    for i in range(hb):
        for j in range(wb):
            left = mv[i, j - 1] if j else zero
            if i == 0:
                pred = left
            else:
                corner = mv[i - 1, j + 1] if j + 1 < wb else (mv[i - 1, j - 1] if j else zero)
                pred = np.median(np.stack([left, mv[i - 1, j], corner]), 0).astype(np.int64)
            mv[i, j] = diff[i, j] + pred
    return mv


def mv_bits_estimate(d: torch.Tensor) -> torch.Tensor:
    """Rough bits of vector differences ``d`` (..., 2) in quarter-pels (the search's rate term, not the coder's):
    about 1 for a zero difference (the adaptive counts soon make it the likeliest symbol by far), else 6 plus
    2·log2(1 + |d|) per component — so that a block does not move to fit noise."""
    nonzero = (d != 0).any(-1)
    return torch.where(
        nonzero, 6 + (2 * torch.log2(1 + d.abs().double())).sum(-1), torch.ones_like(nonzero, dtype=torch.float64)
    )


def _luma(frame: torch.Tensor) -> torch.Tensor:
    """(H, W, 3) uint8 → (H, W) float32 sum of the channels (the search compares all three at once)."""
    return frame.to(torch.float32).sum(2)


class _BlockMatcher:
    """SAD of every block of ``cur`` against ``ref`` displaced by per-block vectors, on the channel sums: the
    search's inner loop. The reference is interpolated once at each of the 16 quarter-pel phases, as
    :func:`predict` interpolates (before its rounding), and edge-padded by more than any vector reaches (the
    values of :func:`predict`'s clamped positions), so that scoring any vector of every block is one gather."""

    PAD = MAX_MV // MV_UNIT + 2

    def __init__(self, cur: torch.Tensor, ref: torch.Tensor):
        self.h, self.w = cur.shape[:2]
        self.hb, self.wb = block_grid(self.h, self.w)
        self.cur = _luma(cur).reshape(self.hb, BLOCK, self.wb, BLOCK).permute(0, 2, 1, 3)
        p, u = self.PAD, MV_UNIT
        r = F.pad(_luma(ref)[None, None], (p, p + 1, p, p + 1), mode="replicate")[0, 0]
        a, b, c, d = r[:-1, :-1], r[:-1, 1:], r[1:, :-1], r[1:, 1:]
        phases = [((u - fy) * ((u - fx) * a + fx * b) + fy * ((u - fx) * c + fx * d)) / u**2
                  for fy in range(u) for fx in range(u)]  # fmt: skip
        self.stride, self.plane = a.shape[1], a.numel()
        self.ref = torch.stack(phases).reshape(-1)
        by = torch.arange(self.hb)[:, None, None, None] * BLOCK + torch.arange(BLOCK)[None, None, :, None]
        bx = torch.arange(self.wb)[None, :, None, None] * BLOCK + torch.arange(BLOCK)[None, None, None, :]
        self.base = (by + p) * self.stride + (bx + p)  # (hb, wb, 16, 16) flat index of each block's pixels

    def sad(self, mv: torch.Tensor) -> torch.Tensor:
        """(hb, wb) float64 SAD of each block at its vector (quarter-pels)."""
        iy, fy = torch.div(mv[..., 0], MV_UNIT, rounding_mode="floor"), mv[..., 0] % MV_UNIT
        ix, fx = torch.div(mv[..., 1], MV_UNIT, rounding_mode="floor"), mv[..., 1] % MV_UNIT
        offset = (fy * MV_UNIT + fx) * self.plane + iy * self.stride + ix
        return (self.cur - self.ref[self.base + offset[:, :, None, None]]).abs().sum((2, 3)).double()


def _coarse_search(cur: torch.Tensor, ref: torch.Tensor, lam: float, hb: int, wb: int) -> torch.Tensor:
    """Integer vectors (hb, wb, 2) in quarter-pels, multiples of 4 pixels, from a full search of ±COARSE_RADIUS
    at 1/4 resolution (blocks of BLOCK/4), biased towards the zero vector."""
    c, r = (F.avg_pool2d(p[None, None], 4)[0, 0] for p in (cur, ref))
    k, n = BLOCK // 4, COARSE_RADIUS
    h, w = c.shape
    padded = F.pad(r[None, None], (n, n, n, n), mode="replicate")[0, 0]
    offsets = [(dy, dx) for dy in range(-n, n + 1) for dx in range(-n, n + 1)]
    sads = torch.stack([(c - padded[n + dy : n + dy + h, n + dx : n + dx + w]).abs() for dy, dx in offsets])
    sads = sads.reshape(len(offsets), hb, k, wb, k).sum((2, 4)).double() * 16  # back to full-resolution SAD
    steps = torch.tensor(offsets, dtype=torch.int64) * 4 * MV_UNIT
    cost = sads + lam * mv_bits_estimate(steps)[:, None, None]
    return steps[cost.argmin(0)]


def _neighbours(mv: torch.Tensor) -> list[torch.Tensor]:
    """Each block's left, right, top and bottom neighbour's vector (its own at the frame's edge)."""
    return [
        torch.cat([mv[:, :1], mv[:, :-1]], 1),
        torch.cat([mv[:, 1:], mv[:, -1:]], 1),
        torch.cat([mv[:1], mv[:-1]], 0),
        torch.cat([mv[1:], mv[-1:]], 0),
    ]


def _pick(matcher: _BlockMatcher, mv: torch.Tensor, best: torch.Tensor, cands, lam: float, pmv: torch.Tensor):
    for cand in cands:
        cand = cand.clamp(-MAX_MV, MAX_MV)
        cost = matcher.sad(cand) + lam * mv_bits_estimate(cand - pmv)
        better = cost < best
        best = torch.where(better, cost, best)
        mv = torch.where(better[..., None], cand, mv)
    return mv, best


_CROSS = [torch.tensor(o) for o in ((-1, 0), (1, 0), (0, -1), (0, 1))]
_SQUARE = [torch.tensor((oy, ox)) for oy in (-1, 0, 1) for ox in (-1, 0, 1) if oy or ox]


def estimate(cur: torch.Tensor, ref: torch.Tensor, lam: float) -> torch.Tensor:
    """Block vectors (H/BLOCK, W/BLOCK, 2) int64 in quarter-pels that predict the padded frame ``cur`` from the
    decoded reference ``ref`` (both (H, W, 3) uint8). A predictive search: the zero vector, a coarse full
    search's, the median predictor's and the neighbours' vectors compete; the winner is refined by whole-pixel
    steps (twice), then ±½ and ±¼ pixel; then the neighbours' final vectors compete once more, so that vectors
    spread across flat regions (see the module docstring). ``lam``: SAD units (0-255 per channel) per bit."""
    matcher = _BlockMatcher(cur, ref)
    zero = torch.zeros(matcher.hb, matcher.wb, 2, dtype=torch.int64)
    coarse = _coarse_search(_luma(cur), _luma(ref), lam, matcher.hb, matcher.wb)
    pmv = median_predictor(coarse)
    mv = zero
    best = matcher.sad(mv) + lam * mv_bits_estimate(mv - pmv)
    mv, best = _pick(matcher, mv, best, [coarse, pmv, *_neighbours(coarse)], lam, pmv)
    for step, pattern in ((MV_UNIT, _SQUARE), (MV_UNIT, _CROSS), (MV_UNIT // 2, _SQUARE), (MV_UNIT // 4, _SQUARE)):
        mv, best = _pick(matcher, mv, best, [mv + o * step for o in pattern], lam, pmv)
    pmv = median_predictor(mv)
    best = matcher.sad(mv) + lam * mv_bits_estimate(mv - pmv)
    mv, best = _pick(matcher, mv, best, [zero, pmv, *_neighbours(mv)], lam, pmv)
    mv, _ = _pick(matcher, mv, best, [mv + o * (MV_UNIT // 4) for o in _SQUARE], lam, pmv)
    return mv


def search_lambda(lam_q: float) -> float:
    """SAD units per bit for the quality level of rate–distortion weight ``lam_q``: the training loss
    ``λ·255²·MSE + bpp`` makes one bit worth 3/λ squared 0-255 errors; as H.264 does, the SAD weight is the
    square root of that, twice over here since the search's SAD is of the three channels' sum."""
    return 2.0 * math.sqrt(3.0 / lam_q)


def as_numpy(mv: torch.Tensor) -> np.ndarray:
    return mv.to(torch.int64).numpy()


# ------------------------------------------------------------------------------------- coding the vectors

MVD_RANGE = 2 * MAX_MV  # a vector's difference to its median predictor lies in ±MVD_RANGE quarter-pels
COUNT_STEP = 64  # what one observed difference adds to its count (a frame of blocks outweighs the start)
COUNT_LIMIT = 1 << 20  # counts are halved (rounding up) when a component's total passes this
MOTION_CLASS_BOUNDS = (MV_UNIT, 4 * MV_UNIT)  # |difference| ≤ 1 pixel | ≤ 4 pixels | more


def _initial_counts() -> np.ndarray:
    """(2, 2·MVD_RANGE+1) int64: the counts a group of pictures starts from, peaked at a zero difference
    (each quarter-pel further half as likely every 2 steps), every symbol at least 1."""
    v = np.abs(np.arange(-MVD_RANGE, MVD_RANGE + 1))
    row = np.floor(2048.0 * 2.0 ** (-v / 2.0)).astype(np.int64) + 1
    return np.stack([row, row])


class MotionCounts:
    """The adaptive model of the vector differences of one group of pictures, per component (dy, dx): integer
    counts, reset at every I-frame and updated after every P-frame by both ends with the differences just coded,
    so encoder and decoder hold the same table on any machine (integers; the probabilities are their quotients)."""

    def __init__(self):
        self.counts = _initial_counts()

    def probabilities(self) -> np.ndarray:
        """(2, 2·MVD_RANGE+1) float64."""
        return self.counts / self.counts.sum(1, keepdims=True)

    def update(self, diff: np.ndarray) -> None:
        for c in range(2):
            self.counts[c] += COUNT_STEP * np.bincount(
                diff[..., c].reshape(-1) + MVD_RANGE, minlength=2 * MVD_RANGE + 1
            )
            if self.counts[c].sum() > COUNT_LIMIT:
                self.counts[c] = (self.counts[c] + 1) // 2


def vector_differences(mv: np.ndarray) -> np.ndarray:
    """(hb, wb, 2) int64 differences to the median predictor, what the stream holds (|d| ≤ MVD_RANGE)."""
    return (torch.from_numpy(mv) - median_predictor(torch.from_numpy(mv))).numpy()


def motion_class(mv: np.ndarray) -> np.ndarray:
    """(hb, wb) int64 class of each block, a context of its residual: 0 the zero vector, 1 a moving block
    predicted exactly by its neighbours, 2..3 a difference up to 1 | 4 pixels (MOTION_CLASS_BOUNDS), 4 more."""
    d = np.abs(vector_differences(mv)).max(-1)
    cls = np.where(d == 0, 1, 2 + np.searchsorted(np.array(MOTION_CLASS_BOUNDS), d, side="left"))
    return np.where((mv == 0).all(-1), 0, cls).astype(np.int64)
