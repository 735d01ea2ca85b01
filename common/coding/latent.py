"""The one interface of fedlvc's latent coders, modelled on CompressAI's ``LatentCodec``: a class that keeps a
latent's training rate and its entropy coding side by side, so that what training optimises is what the coder
spends. Four classes implement it:

- :class:`common.coding.entropy.FactorizedCoder`: I-frames under the factorized prior (v1-v3); ``params``: the
  level;
- :class:`common.coding.hypercoder.HyperCoder`: I-frames under the hyperprior (v4); ``params``:
  :class:`common.coding.hypercoder.HyperParams` (ẑ and the table of every element);
- :class:`common.coding.pframe.PFrameCoder`: latent P-frames under the temporal prior; ``params``: (means,
  scales) of every element;
- :class:`common.motion.residual.ResidualCoder`: a motion model's residual latents under its residual prior;
  ``params`` as a P-frame's.

Every one has the same methods:

- ``training_bits(latent, training)``: differentiable bits per row (B,) of a batch of latents under
  :class:`Training` (the training path, :mod:`common.train.segments`);
- ``fit(y_hat, condition)``: the encoder's side, (the latent this coder codes for the integer latent ``y_hat``:
  within its support and tables, its coding parameters);
- ``bits(latent, params)``: the ideal code length −Σ log2 p in bits under the coding tables;
- ``compress(ans, latent, params)``: push the latent onto a constriction ANS stack;
- ``decompress(ans, condition, shape)``: pop a latent of ``shape`` off the stack, rebuilding its parameters from
  :class:`Condition` and what it decodes first.

A payload (one frame's ANS words and its check value) is :func:`common.coding.entropy.pack` and
:func:`common.coding.entropy.unpack` around one coder; a motion P-frame's also holds its block vectors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from common.net.temporal import MotionHistory


@dataclass(frozen=True)
class Condition:
    """What encoder and decoder both hold before a latent is coded: the quality level (0-based) and, for a
    P-frame, the previous decoded latent ``prev`` (the means; zeros for a motion residual), the group's motion
    ``history`` and the contexts ``base`` before the in-frame value when they are not the temporal ones of
    ``prev`` (a motion residual's, :func:`common.net.temporal.residual_context`)."""

    level: int
    prev: np.ndarray | None = None
    history: MotionHistory | None = None
    base: torch.Tensor | None = None

    @property
    def intra(self) -> bool:
        return self.prev is None


@dataclass(frozen=True)
class Training:
    """What a training rate is conditioned on, per row: the quality ``levels`` (B,); for P-frames also the
    prior's ``raw`` scales (B, C, contexts) (computed once per batch: one call of the prior module), the previous
    coded latents ``prev`` (B, C, h, w) (the means) and the context indices ``contexts`` of the coded latent."""

    levels: torch.Tensor
    raw: torch.Tensor | None = None
    prev: torch.Tensor | None = None
    contexts: torch.Tensor | None = None


class IntraCoder:
    """What the two I-frame coders share: their training rate, which the model computes
    (:meth:`common.net.model.FedlvcCodec.intra_likelihoods`: the training path of single frames, below the coders,
    needs it too)."""

    def __init__(self, model):
        self.model, self.support = model, model.cfg.support

    def training_bits(self, latent: torch.Tensor, training: Training) -> torch.Tensor:
        """Differentiable bits per row (B,) of everything an I-frame codes for the (noisy or integer) latents."""
        return -torch.log2(self.model.intra_likelihoods(latent, training.levels)).sum(1)


class LatentCodec(Protocol):
    """See the module docstring."""

    def training_bits(self, latent: torch.Tensor, training: Training) -> torch.Tensor: ...

    def fit(self, y_hat: np.ndarray, condition: Condition) -> tuple[np.ndarray, object]: ...

    def bits(self, latent: np.ndarray, params) -> float: ...

    def compress(self, ans, latent: np.ndarray, params) -> None: ...

    def decompress(self, ans, condition: Condition, shape: tuple[int, int, int]) -> np.ndarray: ...
