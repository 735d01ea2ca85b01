"""The P-frame (temporal) prior: what a P-frame latent element is conditioned on and its probability under it.

A P-frame latent element is coded under a Laplace centred on the previous decoded latent, quantized to unit bins
(:func:`laplace_likelihood`; :func:`laplace_bits` is its closed form in bits for the encoder's rate–distortion
choice), with a scale per quality level, channel and context (:class:`TemporalPrior`). The context is an
integer function of decoded latents only, so encoder and decoder agree exactly: it combines the previous
latent's local gradient, the motion history of the element's 3x3 neighbourhood in its group of pictures
(:class:`MotionHistory`), and (architecture v3) how many elements of the frame's channel groups decoded
before it changed at its position (:class:`PFrameContexts`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .priors import LIKELIHOOD_FLOOR

# P-frame contexts (see temporal_context): 5 buckets of the previous latent's local gradient × 8 motion values:
# no history yet (the first P-frame of a group), 4 buckets of the last change in the 3×3 neighbourhood, or
# 3 buckets of how many frames the neighbourhood has been still.
GRADIENT_BOUNDS = (1, 2, 4, 8)
MOTION_BOUNDS = (2, 4, 8)  # a change of 1 | 2-3 | 4-7 | >= 8
STILL_BOUNDS = (2, 4)  # still for 1 | 2-3 | >= 4 frames
STILL_CAP = 255
NO_MOTION_HISTORY = 0
MOTION_VALUES = 1 + (len(MOTION_BOUNDS) + 1) + (len(STILL_BOUNDS) + 1)
TEMPORAL_CONTEXTS = (len(GRADIENT_BOUNDS) + 1) * MOTION_VALUES
# Contexts inside a P-frame (architecture v3): the latent's channels are coded in P_GROUPS contiguous groups,
# one after the other; an element of a later group also sees how many elements of the earlier groups changed
# at its own position: 0 = none there nor in the 3x3 neighbourhood, 1 = none there but some next to it,
# 2.. = 1 | 2-3 | >= 4 changed there (IN_FRAME_BOUNDS). Elements of the first group always have value 0.
P_GROUPS = 4
IN_FRAME_BOUNDS = (2, 4)
IN_FRAME_VALUES = 2 + len(IN_FRAME_BOUNDS) + 1


MIN_LAPLACE_SCALE = 0.03
MAX_LAPLACE_BITS = -math.log2(LIKELIHOOD_FLOOR)  # what laplace_likelihood's floor costs


class TemporalPrior(nn.Module):
    """Per-level, per-channel, per-context Laplace scales of a P-frame latent around the previous decoded
    latent: ``forward(levels)`` → raw scale parameters (B, C, contexts). An Embedding, so DP-SGD gives it
    per-sample gradients like the other priors."""

    def __init__(self, num_levels: int, channels: int, contexts: int = TEMPORAL_CONTEXTS):
        super().__init__()
        self.channels, self.contexts = channels, contexts
        self.table = nn.Embedding(num_levels, channels * contexts)
        with torch.no_grad():
            self.table.weight.fill_(0.0)  # softplus(0) + floor ≈ 0.72 quantization steps at start

    def forward(self, levels: torch.Tensor) -> torch.Tensor:
        return self.table(levels).view(-1, self.channels, self.contexts)


def laplace_scale(raw: torch.Tensor) -> torch.Tensor:
    return MIN_LAPLACE_SCALE + F.softplus(raw)


def laplace_likelihood(y: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """p(y) of integer-valued y under a Laplace(mean, scale) quantized to unit bins centred on integers."""
    a = (y - mean).abs()
    inner = 1.0 - 0.5 * (torch.exp(-(0.5 - a).clamp_min(0) / scale) + torch.exp(-(0.5 + a) / scale))
    outer = 0.5 * torch.exp(-(a - 0.5).clamp_min(0) / scale) * -torch.expm1(-1.0 / scale)
    return torch.where(a < 0.5, inner, outer).clamp_min(LIKELIHOOD_FLOOR)


def temporal_scales(raw: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """Laplace scale of every element: raw (B, C, K) gathered by ctx (B, C, h, w)."""
    b, c = ctx.shape[:2]
    picked = torch.gather(raw, 2, ctx.reshape(b, c, -1))
    return laplace_scale(picked).view_as(ctx)


def laplace_bit_tables(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pieces of :func:`laplace_bits` for the raw scales ``raw`` (any shape), each shaped like it: the bits at
    distance 0 (−log2(1 − e^(−½/s))), the constant part of the bits at any other distance
    (−log2(½·(1 − e^(−1/s)))) and 1/(s·ln 2)."""
    scale = laplace_scale(raw)
    return (
        -torch.log2(-torch.expm1(-0.5 / scale)),
        1.0 - torch.log2(-torch.expm1(-1.0 / scale)),
        1.0 / (scale * math.log(2.0)),
    )


@torch.no_grad()
def laplace_bits(
    zero: torch.Tensor, step: torch.Tensor, per_step: torch.Tensor, distance: torch.Tensor
) -> torch.Tensor:
    """−log2 p of an integer ``distance`` from the mean under the quantized Laplace of :func:`laplace_likelihood`
    (same floor), in closed form from the :func:`laplace_bit_tables` of its scale."""
    bits = torch.where(distance < 0.5, zero, step + (distance - 0.5) * per_step)
    return bits.clamp_max(MAX_LAPLACE_BITS)


@dataclass
class MotionHistory:
    """What the P-frames of a group have shown so far, per latent element (float tensors (B, C, h, w) holding
    integers): ``change`` — the largest |ŷ_t − ŷ_{t−1}| of the last P-frame in the 3×3 neighbourhood;
    ``still`` — for how many frames in a row that neighbourhood has not changed (capped)."""

    change: torch.Tensor
    still: torch.Tensor


@torch.no_grad()
def next_history(history: MotionHistory | None, prev: torch.Tensor, current: torch.Tensor) -> MotionHistory:
    """The history after decoding P-frame latent ``current`` on top of ``prev`` (None: right after the I-frame)."""
    change = F.max_pool2d((current.float() - prev.float()).abs().contiguous(), 3, stride=1, padding=1)
    still = torch.zeros_like(change) if history is None else history.still
    still = torch.where(change > 0, torch.zeros_like(still), (still + 1).clamp_max(STILL_CAP))
    return MotionHistory(change, still)


@torch.no_grad()
def history_value(history: MotionHistory | None, like: torch.Tensor) -> torch.Tensor:
    """The motion value (0..MOTION_VALUES−1, int64, shaped like ``like``) of every element: NO_MOTION_HISTORY for
    the group's first P-frame; else, where the neighbourhood changed in the last frame, that change bucketed by
    MOTION_BOUNDS (1..4), and where it did not, for how long it has been still, bucketed by STILL_BOUNDS (5..7):
    a background still for many frames stays still."""
    if history is None:
        return torch.full(like.shape, NO_MOTION_HISTORY, dtype=torch.int64, device=like.device)
    dtype = history.change.dtype
    moved = 1 + torch.bucketize(
        history.change, torch.tensor(MOTION_BOUNDS, dtype=dtype, device=like.device), right=True
    )
    still = (
        1
        + len(MOTION_BOUNDS)
        + 1
        + torch.bucketize(history.still, torch.tensor(STILL_BOUNDS, dtype=dtype, device=like.device), right=True)
    )
    return torch.where(history.change > 0, moved, still)


@torch.no_grad()
def temporal_context(prev: torch.Tensor, history: MotionHistory | None) -> torch.Tensor:
    """Context index (B, C, h, w) int64 of every element of a P-frame latent, by integer arithmetic on the
    decoded latents only (so encoder and decoder agree exactly on any machine): the spatial activity of
    ``prev`` — the largest absolute difference to its 4 neighbours, bucketed by GRADIENT_BOUNDS (a moving edge
    changes the latent where it is not flat) — times MOTION_VALUES, plus the element's :func:`history_value`."""
    p = prev.float().contiguous()
    padded = F.pad(p, (1, 1, 1, 1), mode="replicate")
    h, w = p.shape[-2:]
    grad = torch.zeros_like(p)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        grad = torch.maximum(grad, (padded[..., dy : dy + h, dx : dx + w] - p).abs())
    g = torch.bucketize(grad, torch.tensor(GRADIENT_BOUNDS, dtype=p.dtype, device=p.device), right=True)
    return g * MOTION_VALUES + history_value(history, g)


@torch.no_grad()
def residual_context(motion_class: torch.Tensor, history: MotionHistory | None, channels: int) -> torch.Tensor:
    """Context index (B, C, h, w) int64 of every element of a motion-compensated residual latent (architecture
    motion): the motion class of its block (``motion_class`` (B, h, w) in 0..len(GRADIENT_BOUNDS), see
    :func:`common.motion.blocks.motion_class`) in place of the previous latent's gradient bucket, times MOTION_VALUES,
    plus the :func:`history_value` of the residual latents the group coded before (``history``: of residual
    latents around zero). The same index range as :func:`temporal_context`, so a P-frame prior's table serves."""
    m = motion_class.to(torch.int64)[:, None].expand(-1, channels, -1, -1)
    return m * MOTION_VALUES + history_value(history, m)


def channel_groups(channels: int, groups: int) -> list[slice]:
    """The contiguous channel ranges a P-frame latent is coded in, in coding order."""
    bounds = [round(g * channels / groups) for g in range(groups + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


@torch.no_grad()
def in_frame_value(changed_before: torch.Tensor) -> torch.Tensor:
    """In-frame context value (B, 1, h, w) int64 from the count (B, 1, h, w) of changed elements of the
    earlier channel groups at each position (see IN_FRAME_BOUNDS); integer arithmetic only."""
    c = changed_before.float()
    near = F.max_pool2d((c > 0).float().contiguous(), 3, stride=1, padding=1).long()
    counted = 2 + torch.bucketize(c, torch.tensor(IN_FRAME_BOUNDS, dtype=c.dtype, device=c.device), right=True)
    return torch.where(c > 0, counted, near)


class PFrameContexts:
    """The contexts of one P-frame latent, channel group by channel group in coding order: ``of(g)`` gives
    group g's context indices (B, n_g, h, w) int64 once ``add`` has been told the values of the groups before
    it (an encoder knows them all; a decoder has just decoded them). ``base``: the contexts before the in-frame
    value (default: :func:`temporal_context` of ``prev`` and ``history``; a residual latent's come from
    :func:`residual_context`)."""

    def __init__(
        self, prev: torch.Tensor, history: MotionHistory | None, groups: int, base: torch.Tensor | None = None
    ):
        self.prev, self.groups = prev, groups
        self.slices = channel_groups(prev.shape[1], groups)
        tctx = temporal_context(prev, history) if base is None else base
        self.base = tctx * IN_FRAME_VALUES if groups > 1 else tctx
        self.count = torch.zeros_like(prev[:, :1], dtype=torch.float32)

    @torch.no_grad()
    def of(self, g: int) -> torch.Tensor:
        sl = self.slices[g]
        return self.base[:, sl] + in_frame_value(self.count) if self.groups > 1 else self.base[:, sl]

    @torch.no_grad()
    def add(self, g: int, values: torch.Tensor) -> None:
        """Group g's chosen (or decoded) values (B, n_g, h, w)."""
        sl = self.slices[g]
        self.count = self.count + (values != self.prev[:, sl]).float().sum(1, keepdim=True)


@torch.no_grad()
def p_context(
    prev: torch.Tensor,
    history: MotionHistory | None,
    current: torch.Tensor | None,
    groups: int,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """Context index (B, C, h, w) int64 of every element of a P-frame latent: :func:`temporal_context`
    alone (groups 1, architecture v2), or combined with the in-frame value of its channel group computed
    from ``current`` (only its earlier groups are read, so a decoder may pass a latent whose later groups
    are not decoded yet)."""
    contexts = PFrameContexts(prev, history, groups, base)
    if groups == 1:
        return contexts.base
    out = torch.empty_like(contexts.base)
    for g, sl in enumerate(contexts.slices):
        out[:, sl] = contexts.of(g)
        contexts.add(g, current[:, sl])
    return out
