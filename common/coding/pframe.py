"""The P-frame latent codec: its training rate and its coding side by side, as CompressAI keeps a latent
codec's likelihood and its entropy coding in one class. Change how P-frames are modelled here.

    ŷ_t ─► context (common.net.temporal: ŷ_{t−1}, the group's motion history, the channel groups of ŷ_t before)
        ─► scale = temporal prior[q, channel, context] (common.net.temporal.TemporalPrior)
        ─► p(ŷ_t) = quantized Laplace(ŷ_{t−1}, scale) ─► ANS (channel order; decoded group by group)

Training (:meth:`PFrameCoder.training_bits`) and coding (:meth:`PFrameCoder.compress` / :meth:`decompress`) use
the same Laplace, the same contexts and the same scales; the contexts are integer functions of decoded latents
only, so encoder and decoder agree exactly. The methods are those of every latent coder
(:mod:`common.coding.latent`).
"""

from __future__ import annotations

import constriction
import numpy as np
import torch

from common.config.options import PFrameRule
from common.errors import FedlvcError
from common.net.model import FedlvcCodec
from common.net.temporal import PFrameContexts, laplace_likelihood, laplace_scale, p_context, temporal_scales

from .latent import Condition, Training
from .rdo import choose_p_latent

MIN_PROBABILITY = 2.0**-24  # constriction (perfect=False) gives every symbol at least about this much


class PFrameCoder:
    """Latent P-frames around the previous decoded latent (:class:`common.coding.latent.Condition` ``prev``).
    ``prior``: the module giving the raw scales (the model's temporal prior by default; a motion model's residual
    latent uses its residual prior, around zero: :class:`common.motion.residual.ResidualCoder`)."""

    def __init__(self, model: FedlvcCodec, prior: torch.nn.Module | None = None):
        self.model, self.support = model, model.cfg.support
        self.prior = prior
        self._raw: dict[int, torch.Tensor] = {}
        self._scales: dict[int, np.ndarray] = {}
        self._laplace = constriction.stream.model.QuantizedLaplace(-self.support, self.support)

    # ----------------------------------------------------------------------------------------- training

    @staticmethod
    def training_bits(latent: torch.Tensor, training: Training) -> torch.Tensor:
        """Differentiable bits per row (B,) of P-frame latents (B, C, h, w) around ``training.prev`` under the
        prior's raw scales (B, C, contexts) gathered by the contexts of the latent."""
        scales = temporal_scales(training.raw, training.contexts)
        return -torch.log2(laplace_likelihood(latent, training.prev, scales)).flatten(1).sum(1)

    # ------------------------------------------------------------------------------------------- coding

    def raw(self, level: int) -> torch.Tensor:
        """(1, C, contexts) float32: the prior's raw scales at ``level``."""
        if level not in self._raw:
            if not self.model.cfg.temporal:
                raise FedlvcError("this model is intra-only: it cannot code P-frames (use --gop 1)")
            with torch.no_grad():
                self._raw[level] = (self.prior or self.model.temporal)(torch.tensor([level]))
        return self._raw[level]

    def scale_table(self, level: int) -> np.ndarray:
        """(C, contexts) float64 Laplace scales of the P-frame prior."""
        if level not in self._scales:
            with torch.no_grad():
                self._scales[level] = laplace_scale(self.raw(level)[0].double()).numpy()
        return self._scales[level]

    def choose(
        self, y: torch.Tensor, condition: Condition, rule: PFrameRule, weights: torch.Tensor | None = None
    ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """The encoder's side of a P-frame, in place of :meth:`fit`: (the latent its P-frame ``rule`` chooses for
        the scaled latent ``y`` (1, C, h, w), :func:`common.coding.rdo.choose_p_latent`, ``weights`` (1, C) being
        the group's channel sensitivities for rate–distortion optimisation; its :meth:`params` under the contexts
        it was chosen under)."""
        lam = torch.tensor([self.model.cfg.lambdas[condition.level]])
        prev = torch.from_numpy(condition.prev).float()[None]
        raw, groups = self.raw(condition.level), self.model.cfg.p_groups
        with torch.inference_mode():  # many small tensor operations: skip autograd's bookkeeping
            chosen, contexts = choose_p_latent(
                y, prev, condition.history, raw, groups, rule, self.support, lam, weights, condition.base
            )
        return chosen[0].numpy().astype(np.int64), self.params(contexts[0].numpy(), condition)

    def fit(self, y_hat: np.ndarray, condition: Condition) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """(the latent clipped to the support, its :meth:`params` under the contexts it makes: with in-frame
        contexts, architecture v3, those of its own channel groups)."""
        latent = np.clip(y_hat, -self.support, self.support)
        groups = self.model.cfg.p_groups
        cur = None if groups == 1 else torch.from_numpy(latent)[None]
        prev = torch.from_numpy(condition.prev)[None]
        ctx = p_context(prev, condition.history, cur, groups, condition.base)[0].numpy()
        return latent, self.params(ctx, condition)

    def params(self, contexts: np.ndarray, condition: Condition) -> tuple[np.ndarray, np.ndarray]:
        """Flattened (means, scales) float64 of every element of a P-frame latent (channel order) coded under the
        context indices ``contexts`` (C, h, w): those :func:`common.coding.rdo.choose_p_latent` chose it under."""
        scales = np.take_along_axis(self.scale_table(condition.level), contexts.reshape(contexts.shape[0], -1), axis=1)
        return condition.prev.reshape(-1).astype(np.float64), scales.reshape(-1)

    def bits(self, latent: np.ndarray, params: tuple[np.ndarray, np.ndarray]) -> float:
        """Ideal code length in bits of a P-frame latent under its :meth:`params`."""
        means, scales = params
        y = np.clip(latent, -self.support, self.support).reshape(-1).astype(np.float64)
        p = laplace_likelihood(*(torch.from_numpy(a) for a in (y, means, scales))).numpy()
        return float(-np.log2(np.maximum(p, MIN_PROBABILITY)).sum())

    def compress(self, ans, latent: np.ndarray, params: tuple[np.ndarray, np.ndarray]) -> None:
        """Push a P-frame latent onto the ANS stack ``ans`` (channel order)."""
        means, scales = params
        ans.encode_reverse(
            np.clip(latent, -self.support, self.support).astype(np.int32).reshape(-1), self._laplace, means, scales
        )

    def decompress(self, ans, condition: Condition, shape: tuple[int, int, int]) -> np.ndarray:
        """Pop a P-frame latent of ``shape`` off ``ans``: channel group by channel group, each one's contexts
        needing the groups before it."""
        c, h, w = shape
        out = np.zeros(shape, dtype=np.int64)
        prev = condition.prev
        contexts = PFrameContexts(
            torch.from_numpy(prev)[None], condition.history, self.model.cfg.p_groups, condition.base
        )
        table = self.scale_table(condition.level)
        for g, sl in enumerate(contexts.slices):
            ctx = contexts.of(g)[0].numpy().reshape(sl.stop - sl.start, -1)
            scales = np.take_along_axis(table[sl], ctx, axis=1).reshape(-1)
            out[sl] = ans.decode(self._laplace, prev[sl].reshape(-1).astype(np.float64), scales).reshape(-1, h, w)
            contexts.add(g, torch.from_numpy(out[sl])[None])
        return out
