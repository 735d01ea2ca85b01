"""The P-frame latent codec: its training rate and its coding side by side, as CompressAI keeps a latent
codec's likelihood and its entropy coding in one class. Change how P-frames are modelled here.

    ŷ_t ─► context (common.net.contexts: ŷ_{t−1}, the group's motion history, the channel groups of ŷ_t before)
        ─► scale = temporal prior[q, channel, context] (common.net.priors.TemporalPrior)
        ─► p(ŷ_t) = quantized Laplace(ŷ_{t−1}, scale) ─► ANS (channel order; decoded group by group)

Training (:meth:`PFrameCoder.training_bits`) and coding (:meth:`PFrameCoder.encode` / :meth:`decode`) use the
same Laplace, the same contexts and the same scales; the contexts are integer functions of decoded latents
only, so encoder and decoder agree exactly.
"""

from __future__ import annotations

import constriction
import numpy as np
import torch

from common.errors import FedlvcError
from common.net.contexts import MotionHistory, PFrameContexts, p_context
from common.net.model import FedlvcCodec
from common.net.priors import laplace_likelihood, laplace_scale, temporal_scales

MIN_PROBABILITY = 2.0**-24  # constriction (perfect=False) gives every symbol at least about this much


class PFrameCoder:
    """``prior``: the module giving the raw scales (the model's temporal prior by default; a motion model's
    residual latent uses its residual prior, around zero, :mod:`common.motion.residual`)."""

    def __init__(self, model: FedlvcCodec, prior: torch.nn.Module | None = None):
        self.model, self.support = model, model.cfg.support
        self.prior = prior
        self._scales: dict[int, np.ndarray] = {}
        self._laplace = constriction.stream.model.QuantizedLaplace(-self.support, self.support)

    # ----------------------------------------------------------------------------------------- training

    @staticmethod
    def training_bits(raw: torch.Tensor, target: torch.Tensor, prev: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """Differentiable bits per row (B,) of P-frame latents ``target`` (B, C, h, w) around ``prev`` under
        the temporal prior's raw scales (B, C, contexts) gathered by the contexts ``ctx``."""
        return -torch.log2(laplace_likelihood(target, prev, temporal_scales(raw, ctx))).flatten(1).sum(1)

    # ------------------------------------------------------------------------------------------- coding

    def scale_table(self, level: int) -> np.ndarray:
        """(C, contexts) float64 Laplace scales of the P-frame prior."""
        if level not in self._scales:
            if not self.model.cfg.temporal:
                raise FedlvcError("this model is intra-only: it cannot code P-frames (use --gop 1)")
            with torch.no_grad():
                raw = (self.prior or self.model.temporal)(torch.tensor([level]))[0].double()
                self._scales[level] = laplace_scale(raw).numpy()
        return self._scales[level]

    def params(
        self, prev: np.ndarray, history: MotionHistory | None, level: int, current: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Flattened (means, scales) float64 of every element of a P-frame latent, in channel order. With
        in-frame contexts (architecture v3) ``current`` is the frame's own latent (the encoder knows it)."""
        groups = self.model.cfg.p_groups
        if groups > 1 and current is None:
            raise ValueError("this model's P-frame contexts need the frame's own latent")
        cur = None if groups == 1 else torch.from_numpy(current)[None]
        return self.params_of(prev, p_context(torch.from_numpy(prev)[None], history, cur, groups)[0].numpy(), level)

    def params_of(self, prev: np.ndarray, ctx: np.ndarray, level: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`params` from context indices ``ctx`` (C, h, w) already computed."""
        scales = np.take_along_axis(self.scale_table(level), ctx.reshape(ctx.shape[0], -1), axis=1)
        return prev.reshape(-1).astype(np.float64), scales.reshape(-1)

    def bits(
        self,
        y_hat: np.ndarray,
        prev: np.ndarray,
        history: MotionHistory | None,
        level: int,
        params: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> float:
        """Ideal code length in bits of a P-frame latent (``params``: its :meth:`params`, when computed)."""
        means, scales = params if params is not None else self.params(prev, history, level, y_hat)
        y = np.clip(y_hat, -self.support, self.support).reshape(-1).astype(np.float64)
        p = laplace_likelihood(*(torch.from_numpy(a) for a in (y, means, scales))).numpy()
        return float(-np.log2(np.maximum(p, MIN_PROBABILITY)).sum())

    def encode(self, coder, y_hat: np.ndarray, params: tuple[np.ndarray, np.ndarray]) -> None:
        """Push a clipped P-frame latent onto the ANS stack ``coder`` (channel order)."""
        means, scales = params
        coder.encode_reverse(
            np.clip(y_hat, -self.support, self.support).astype(np.int32).reshape(-1), self._laplace, means, scales
        )

    def decode(
        self,
        coder,
        prev: np.ndarray,
        history: MotionHistory | None,
        level: int,
        shape: tuple[int, int, int],
        base: torch.Tensor | None = None,
    ) -> np.ndarray:
        """Pop a P-frame latent of ``shape`` off ``coder``: channel group by channel group, each one's
        contexts needing the groups before it (``base``: contexts before the in-frame value, when not the
        temporal ones of ``prev`` and ``history``)."""
        c, h, w = shape
        out = np.zeros(shape, dtype=np.int64)
        contexts = PFrameContexts(torch.from_numpy(prev)[None], history, self.model.cfg.p_groups, base)
        table = self.scale_table(level)
        for g, sl in enumerate(contexts.slices):
            ctx = contexts.of(g)[0].numpy().reshape(sl.stop - sl.start, -1)
            scales = np.take_along_axis(table[sl], ctx, axis=1).reshape(-1)
            out[sl] = coder.decode(self._laplace, prev[sl].reshape(-1).astype(np.float64), scales).reshape(-1, h, w)
            contexts.add(g, torch.from_numpy(out[sl])[None])
        return out
