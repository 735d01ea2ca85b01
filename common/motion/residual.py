"""Motion-compensated P-frames (model config ``motion``; bitstream version 5): block vectors on the previous
*decoded* frame (:mod:`common.motion.blocks`) and the residual — frame minus prediction — coded by a second transform
codec, its latent under a quantized Laplace around zero with a learned scale per (level, channel, context), the
context being the block's motion class, where the group's earlier residuals were (common.net.temporal
.residual_context) and the channel groups decoded before. Its training rate and its coding sit side by side here,
as :mod:`common.coding.pframe` keeps the latent P-frames'::

    v = search(x_t, x̂_{t−1}) ─► v − median(neighbours) ─► ANS(adaptive counts of the group) ──────────┐
    x_t − MC(x̂_{t−1}, v) ─► res_g_a ─► ×gain[q] ─► RDO ─► ŷ_r ─► ANS(Laplace(0, scale[q, c, ctx])) ─┴─► .lvc
    decoder:  v, ŷ_r ─► x̂_t = clip(MC(x̂_{t−1}, v) + res_g_s(ŷ_r × inv_gain[q]))  (uint8: the next reference)

Why a residual and not a latent conditioned on the prediction: the P-frame prior of the latent P-frames sees the
previous latent at the same position, and at the transforms' stride of 16 a shift of 1-4 pixels decorrelates the
latent about as much as new content does (measured: interpolating the previous latent by the motion predicts no
better than not moving it), so motion has to be compensated on pixels; and conditioning the latent's entropy
model on a prediction made from float reconstructions would make *parsing* depend on floating point, which
differs between machines. Here everything the decoder parses depends on decoded integers only (vectors, residual
latents, counts): a stream decodes on any machine. The reconstruction runs through the float synthesis, so
across machines decoded P-frames may differ by rounding, which the prediction carries to the end of the group
(tests/test_motion_codec.py measures it).

Training (:func:`forward_motion_segment`) runs the coder's own chain first, without gradients and without calling
any module (Opacus' hooks see only the training pass): the decoded I-frame, then per P-frame the search, the
prediction, the RDO choice and the decoded frame that is the next reference. The training pass then codes every
P-frame's residual against that fixed prediction, calling each module once on all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import constriction
import numpy as np
import torch

from common.coding.entropy import LatentCoders, payload_words, pop_check, push_check
from common.coding.latent import Condition, Training
from common.coding.pframe import MIN_PROBABILITY, PFrameCoder
from common.coding.rdo import choose_p_latent, hook_free, synthesis_sensitivity
from common.config.options import PFrameRule
from common.errors import FedlvcError
from common.net.model import FedlvcCodec
from common.net.temporal import MotionHistory, next_history, residual_context

from .blocks import (
    MAX_MV,
    MVD_RANGE,
    MotionCounts,
    estimate,
    motion_class,
    predict,
    search_lambda,
    vector_differences,
    vectors_from_differences,
)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] (unclamped) → (B, H, W, 3) uint8: what a decoder holds of a frame."""
    return x.detach().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1)


def to_unit(frames: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 → (B, 3, H, W) float32 in [0, 1]."""
    return frames.permute(0, 3, 1, 2).float().div(255.0).contiguous()


def _gains(gains, levels: torch.Tensor) -> torch.Tensor:
    return torch.exp(gains.log_gain.weight.detach()[levels])[:, :, None, None]


def vector_bits(diff: np.ndarray, counts: MotionCounts) -> float:
    """Code length in bits of block-vector differences (hb, wb, 2) under the group's counts."""
    p = counts.probabilities()
    return float(-sum(np.log2(np.maximum(p[c][diff[..., c].reshape(-1) + MVD_RANGE], MIN_PROBABILITY)).sum()
                      for c in range(2)))  # fmt: skip


class ResidualCoder(PFrameCoder):
    """The residual latents of motion-compensated P-frames (a latent coder, :mod:`common.coding.latent`): a
    P-frame coder around zero under the residual prior, whose contexts before the in-frame value are the blocks'
    motion classes and the group's residual history (:meth:`condition`)."""

    def __init__(self, model: FedlvcCodec):
        super().__init__(model, model.res_prior)

    @staticmethod
    def condition(level: int, classes: torch.Tensor, history: MotionHistory | None, shape) -> Condition:
        """What a residual latent of ``shape`` (C, h, w) is coded under: means zero, the contexts of the blocks'
        motion ``classes`` (1, h, w) and the group's residual ``history``."""
        base = residual_context(classes, history, shape[0])
        return Condition(level, np.zeros(shape, dtype=np.int64), history, base)


def residual_sensitivity(model: FedlvcCodec, y_r: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """(B, C) channel sensitivities of the residual synthesis for rate–distortion optimisation, measured once per
    group of pictures at its first P-frame's residual latent before rounding (at an all-zero latent every
    activation of the bias-free transform sits on its kink, which would weigh distortion nothing)."""
    return synthesis_sensitivity(model, y_r.detach(), levels, residual=True)


@dataclass
class _Chain:
    """What the coder does with a batch of segments, P-frame by P-frame (rows b·(S−1) + s−1)."""

    pred: torch.Tensor  # (B·(S−1), 3, H, W) motion-compensated predictions in [0, 1]
    chosen: torch.Tensor  # (B·(S−1), C, h, w) the integer residual latents the coder chose
    contexts: torch.Tensor  # (B·(S−1), C, h, w) their context indices
    vector_bits: torch.Tensor  # (B,) the bits of each segment's block vectors


@torch.no_grad()
def _coder_chain(model: FedlvcCodec, x: torch.Tensor, levels: torch.Tensor, rule: PFrameRule, raw) -> _Chain:
    """The coder's decisions on segments ``x`` (B, S, 3, H, W), without gradients or module calls."""
    b, frames = x.shape[:2]
    support, groups = model.cfg.support, model.cfg.p_groups
    y0 = (hook_free(model.g_a, x[:, 0] - 0.5) * _gains(model.gain, levels)).round().clamp(-support, support)
    ref = to_uint8(hook_free(model.g_s, y0 * _gains(model.inv_gain, levels)) + 0.5)
    lam = torch.tensor(model.cfg.lambdas, dtype=x.dtype)[levels]
    weights = None
    history, counts, bits = None, [MotionCounts() for _ in range(b)], torch.zeros(b, dtype=torch.float64)
    preds, chosen, contexts = [], [], []
    for s in range(1, frames):
        cur = to_uint8(x[:, s])
        mvs = [estimate(cur[i], ref[i], search_lambda(float(lam[i]))) for i in range(b)]
        pred = torch.stack([predict(ref[i], mvs[i]) for i in range(b)])
        classes = torch.from_numpy(np.stack([motion_class(mv.numpy()) for mv in mvs]))
        for i, mv in enumerate(mvs):
            diff = vector_differences(mv.numpy())
            bits[i] += vector_bits(diff, counts[i])
            counts[i].update(diff)
        unit = to_unit(pred)
        y_r = hook_free(model.res_g_a, to_unit(cur) - unit) * _gains(model.res_gain, levels)
        if rule.uses_rd and weights is None:
            weights = residual_sensitivity(model, y_r, levels)
        base = residual_context(classes, history, y_r.shape[1])  # the P-frame rule around zero, as the coder's
        q, ctx = choose_p_latent(y_r, torch.zeros_like(y_r), history, raw, groups, rule, support, lam, weights, base)
        ref = to_uint8(unit + hook_free(model.res_g_s, q * _gains(model.res_inv_gain, levels)))
        history = next_history(history, torch.zeros_like(q), q)
        preds.append(unit)
        chosen.append(q)
        contexts.append(ctx)

    def rows(ts: list) -> torch.Tensor:  # frame-major → segment-major
        return torch.stack(ts, 1).reshape(b * (frames - 1), *ts[0].shape[1:])

    return _Chain(rows(preds), rows(chosen), rows(contexts), bits.float())


def forward_motion_segment(model: FedlvcCodec, x: torch.Tensor, levels: torch.Tensor, rule: PFrameRule) -> dict:
    """Training path of a motion model on rows of consecutive frames x (B, S, 3, H, W): frame 0 as an I-frame
    (noisy latent when training, rounded otherwise), frames 1..S−1 as motion-compensated P-frames against the
    coder's own chain (see the module docstring): the residual latent's rate under the residual prior of the
    integer latent the encoder would code (straight-through), its synthesis on the noisy latent when training.
    Returns x_hat (B, S, 3, H, W) and per-row bits (B,) — the block vectors' bits included (a constant).

    Module calls: the intra transforms and gains on the B I-frames, the residual ones once on the B·(S−1)
    P-frames, the priors on the B segments; :func:`common.train.privacy.fold_segment_grad_samples` sums per segment."""
    b, frames = x.shape[:2]
    x0 = x[:, 0].contiguous()
    y0 = model.analysis(x0, levels)
    y0_tilde = y0 + torch.empty_like(y0).uniform_(-0.5, 0.5) if model.training else torch.round(y0)
    x0_hat = model.synthesis(y0_tilde, levels)
    bits = LatentCoders(model).intra.training_bits(y0_tilde, Training(levels))
    raw = model.res_prior(levels)
    chain = _coder_chain(model, x, levels, rule, raw.detach())
    p_levels = levels.repeat_interleave(frames - 1)
    cur = x[:, 1:].reshape(b * (frames - 1), *x.shape[2:])
    y_r = model.residual_analysis(cur - chain.pred, p_levels)
    target = y_r + (chain.chosen - y_r).detach()
    y_tilde = y_r + torch.empty_like(y_r).uniform_(-0.5, 0.5) if model.training else target
    x_hat = chain.pred + model.residual_synthesis(y_tilde, p_levels)
    training = Training(p_levels, raw.repeat_interleave(frames - 1, 0), torch.zeros_like(target), chain.contexts)
    p_bits = ResidualCoder.training_bits(target, training)
    bits = bits + p_bits.view(b, frames - 1).sum(1) + chain.vector_bits.to(bits)
    x_hat = torch.cat([x0_hat[:, None], x_hat.view(b, frames - 1, *x_hat.shape[1:])], 1)
    return {"x_hat": x_hat, "bits": bits}


@dataclass
class MotionTrial:
    """A P-frame coded as a motion-compensated frame, before the coder's state moves on."""

    payload: bytes
    bits: float  # ideal code length
    decoded: torch.Tensor  # (H, W, 3) uint8, padded
    still_share: float  # of the blocks whose vector is zero
    commit: object  # () -> None: move the state on, this frame being coded so


class MotionPFrames:
    """The motion-compensated P-frames of one stream at one quality level: the state both ends keep — the
    previous decoded frame (padded, uint8), the group's residual history and vector counts, all reset at each
    I-frame — and the coding of one P-frame into one ANS stack (check value at the bottom, the residual latent,
    the vector differences on top: decoded first)."""

    def __init__(self, model: FedlvcCodec, level: int):
        self.model, self.level = model, level
        self.levels = torch.tensor([level])
        self.residual = ResidualCoder(model)
        self.lam = torch.tensor([model.cfg.lambdas[level]])
        self.ref: torch.Tensor | None = None
        self.history: MotionHistory | None = None
        self.counts = MotionCounts()
        self.weights: torch.Tensor | None = None  # the group's channel sensitivities (rate–distortion optimisation)

    def reset(self, decoded: torch.Tensor) -> None:
        """After an I-frame: ``decoded`` (H, W, 3) uint8, the padded decoded I-frame."""
        self.ref, self.history, self.counts, self.weights = decoded, None, MotionCounts(), None

    def _vector_models(self) -> list:
        return [constriction.stream.model.Categorical(p.astype(np.float32), perfect=False)
                for p in self.counts.probabilities()]  # fmt: skip

    def _decoded(self, pred: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return to_uint8(to_unit(pred[None]) + self.model.residual_synthesis(q.float(), self.levels))[0]

    def _advance(self, q: torch.Tensor, diff: np.ndarray, decoded: torch.Tensor) -> None:
        self.history = next_history(self.history, torch.zeros_like(q.float()), q.float())
        self.counts.update(diff)
        self.ref = decoded

    def follow(self, decoded: torch.Tensor) -> None:
        """After a latent P-frame (the group's other kind): its padded decoded frame is the next reference."""
        self.ref = decoded

    def trial(self, frame: torch.Tensor, rule: PFrameRule, check) -> MotionTrial:
        """The padded frame (H, W, 3) uint8 coded as a motion-compensated P-frame, the state not yet moved on
        (``commit`` does); ``check(latent, differences)`` gives the 32-bit value the stream ends with."""
        with torch.inference_mode():
            mv = estimate(frame, self.ref, search_lambda(float(self.lam)))
            pred = predict(self.ref, mv)
            y_r = self.model.residual_analysis(to_unit(frame[None]) - to_unit(pred[None]), self.levels)
        weights = self.weights
        if rule.uses_rd and weights is None:  # the group's first P-frame (a backward pass: outside inference)
            weights = residual_sensitivity(self.model, y_r.clone(), self.levels)
        with torch.inference_mode():
            return self._trial(mv, pred, y_r, rule, check, weights)

    def _trial(self, mv, pred, y_r, rule: PFrameRule, check, weights) -> MotionTrial:
        diff = vector_differences(mv.numpy())
        classes = torch.from_numpy(motion_class(mv.numpy()))[None]
        condition = ResidualCoder.condition(self.level, classes, self.history, y_r.shape[1:])
        latent, params = self.residual.choose(y_r, condition, rule, weights)
        q = torch.from_numpy(latent)[None]
        coder = constriction.stream.stack.AnsCoder()
        push_check(coder, check(latent, diff))
        self.residual.compress(coder, latent, params)
        for c, m in reversed(list(enumerate(self._vector_models()))):
            coder.encode_reverse(diff[..., c].reshape(-1).astype(np.int32) + MVD_RANGE, m)
        bits = self.residual.bits(latent, params) + vector_bits(diff, self.counts)
        decoded = self._decoded(pred, q)

        def commit() -> None:
            self.weights = weights
            self._advance(q[0], diff, decoded)

        payload = coder.get_compressed().astype("<u4").tobytes()
        return MotionTrial(payload, bits, decoded, float((mv == 0).all(-1).float().mean()), commit)

    @torch.inference_mode()
    def unpack(self, payload: bytes, shape: tuple[int, int, int], check) -> torch.Tensor:
        """The padded decoded frame (H, W, 3) uint8 of a P-frame's payload; ``check(latent, differences)`` the
        value its stream must end with. Raises FedlvcError on any damage, before the frame is reconstructed."""
        _, h, w = shape
        words = payload_words(payload)
        try:
            coder = constriction.stream.stack.AnsCoder(words)
            diff = np.stack([coder.decode(m, h * w) for m in self._vector_models()], -1).reshape(h, w, 2)
            diff = diff.astype(np.int64) - MVD_RANGE
            mv = vectors_from_differences(diff)
            if np.abs(mv).max(initial=0) > MAX_MV:
                raise FedlvcError("bitstream chunk is damaged (a motion vector out of range)")
            classes = torch.from_numpy(motion_class(mv))[None]
            condition = ResidualCoder.condition(self.level, classes, self.history, shape)
            latent = self.residual.decompress(coder, condition, shape)
            pop_check(coder, check(latent, diff))
        except (ValueError, RuntimeError, AssertionError) as e:
            raise FedlvcError(f"bitstream chunk does not decode: {e}") from None
        q = torch.from_numpy(latent)[None]
        mv_t = torch.from_numpy(mv)
        decoded = self._decoded(predict(self.ref, mv_t), q)
        self._advance(q[0], diff, decoded)
        return decoded
