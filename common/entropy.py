"""Entropy coding of quantized latents with the model's learned prior (constriction's ANS coder).

For quality level q and channel c the prior's discretised pmf over the symbols ``k ∈ [-R, R]`` is
``CDF(k+½) − CDF(k−½)``, with the tails folded into the two end symbols, the same formula the training
loss uses for the rate. Tables are computed in float64 from the weights, so encoder and decoder that load
the same checkpoint build bit-identical models.
"""

from __future__ import annotations

import constriction
import numpy as np
import torch

from .errors import FedlvcError
from .model import FedlvcCodec, mixture_cdf


# Each payload ends (in decoding order) with a fixed 32-bit sentinel: decoding a payload as a larger latent
# than it holds would eat into the sentinel, so a header forged to claim another frame size is caught.
SENTINEL = np.array([0xF1, 0x7C], dtype=np.int32)  # two 16-bit symbols under a uniform model
_SENTINEL_MODEL = constriction.stream.model.Uniform(1 << 16)
MIN_PROBABILITY = 2.0**-24  # constriction (perfect=False) gives every symbol at least about this much


class LatentCoder:
    """ANS coding of one frame's latent ``(C, h, w)`` int array per quality level."""

    def __init__(self, model: FedlvcCodec):
        self.model = model
        self.support = model.cfg.support
        self._pmfs: dict[int, np.ndarray] = {}
        self._models: dict[int, list] = {}

    def pmf(self, level: int) -> np.ndarray:
        """(C, 2R+1) float64 probabilities of the symbols -R..R for every channel."""
        if level not in self._pmfs:
            with torch.no_grad():
                logits, means, log_scales = (
                    t[0].double() for t in self.model.prior(torch.tensor([level]))
                )
                r = self.support
                edges = torch.arange(-r - 0.5, r + 1.0, 1.0, dtype=torch.float64)  # 2R+2 bin edges
                cdf = mixture_cdf(edges[None, :], logits[:, None, :], means[:, None, :], log_scales[:, None, :])
                cdf[:, 0], cdf[:, -1] = 0.0, 1.0  # fold the tails into the end symbols
                pmf = torch.diff(cdf, dim=1).clamp_min(0.0).numpy()
            self._pmfs[level] = pmf / pmf.sum(1, keepdims=True)
        return self._pmfs[level]

    def _categoricals(self, level: int) -> list:
        if level not in self._models:
            self._models[level] = [
                constriction.stream.model.Categorical(p.astype(np.float32), perfect=False) for p in self.pmf(level)
            ]
        return self._models[level]

    def clip(self, y_hat: np.ndarray) -> np.ndarray:
        return np.clip(y_hat, -self.support, self.support)

    def bits(self, y_hat: np.ndarray, level: int) -> float:
        """Ideal code length −Σ log2 p(ŷ) in bits of a latent (C, h, w) under the coding tables."""
        sym = (self.clip(y_hat) + self.support).reshape(y_hat.shape[0], -1).astype(np.int64)
        p = np.take_along_axis(self.pmf(level), sym, axis=1)
        return float(-np.log2(np.maximum(p, MIN_PROBABILITY)).sum())

    def encode(self, y_hat: np.ndarray, level: int) -> bytes:
        """Encode a clipped integer latent (C, h, w) to bytes (a whole number of 32-bit words)."""
        models = self._categoricals(level)
        sym = (self.clip(y_hat) + self.support).astype(np.int32).reshape(y_hat.shape[0], -1)
        coder = constriction.stream.stack.AnsCoder()
        coder.encode_reverse(SENTINEL, _SENTINEL_MODEL)  # bottom of the stack: decoded last
        for c in reversed(range(sym.shape[0])):  # ANS is a stack: encode backwards, decode forwards
            coder.encode_reverse(sym[c], models[c])
        return coder.get_compressed().astype("<u4").tobytes()

    def decode(self, payload: bytes, level: int, shape: tuple[int, int, int]) -> np.ndarray:
        """Inverse of :meth:`encode`; raises FedlvcError when the payload does not decode to exactly ``shape``."""
        if len(payload) % 4:
            raise FedlvcError("bitstream chunk is not a whole number of 32-bit words")
        models = self._categoricals(level)
        c, h, w = shape
        words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
        try:
            coder = constriction.stream.stack.AnsCoder(words)
            out = np.stack([coder.decode(models[i], h * w) for i in range(c)])
            sentinel = coder.decode(_SENTINEL_MODEL, len(SENTINEL))
        except (ValueError, RuntimeError, AssertionError) as e:
            raise FedlvcError(f"bitstream chunk does not decode: {e}") from None
        if not np.array_equal(sentinel, SENTINEL):
            raise FedlvcError("bitstream chunk does not decode to the frame size in the header (forged or foreign stream)")
        if not coder.is_empty():
            raise FedlvcError("bitstream chunk has data left over after decoding (damaged or foreign stream)")
        return (out.astype(np.int64) - self.support).reshape(c, h, w)
