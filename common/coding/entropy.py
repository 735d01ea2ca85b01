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

from common.errors import FedlvcError
from common.net.contexts import MotionHistory
from common.net.model import FedlvcCodec
from common.net.priors import mixture_pmf

from .hypercoder import HyperCoder, coding_tables
from .pframe import MIN_PROBABILITY, PFrameCoder

# Each payload ends (in decoding order) with a 32-bit check value, two 16-bit symbols under a uniform model:
# the CRC-32 of the frame's position and latent (bitstream version 3, common.coding.bitstream.latent_checksum), or
# a fixed sentinel (versions 1 and 2). Damage, or decoding a payload as a larger latent than it holds (a
# header forged to claim another frame size), changes or eats into it, so the frame is refused.
SENTINEL = 0x00F1_007C  # the fixed check value of versions 1 and 2 (16-bit symbols 0xF1, 0x7C)
_CHECK_MODEL = constriction.stream.model.Uniform(1 << 16)


def _check_symbols(value: int) -> np.ndarray:
    return np.array([value >> 16, value & 0xFFFF], dtype=np.int32)


def push_check(coder, value: int) -> None:
    """Put the 32-bit check value at the bottom of an ANS stack (encode it first: it is decoded last)."""
    coder.encode_reverse(_check_symbols(value), _CHECK_MODEL)


def pop_check(coder, expected: int) -> None:
    """Read the check value a payload ends with and refuse the chunk unless it is ``expected`` and nothing is
    left after it."""
    hi, lo = (int(v) for v in coder.decode(_CHECK_MODEL, 2))
    if (hi << 16 | lo) != expected:
        raise FedlvcError("bitstream chunk is damaged (checksum mismatch)")
    if not coder.is_empty():
        raise FedlvcError("bitstream chunk is damaged (data left over after decoding)")


class LatentCoder:
    """ANS coding of one frame's latent ``(C, h, w)`` int array per quality level: I-frames under the
    factorized prior (here), P-frames (``prev`` given) under the temporal prior (:class:`PFrameCoder`,
    ``self.p``). Every payload ends with a 32-bit check value."""

    def __init__(self, model: FedlvcCodec):
        self.model = model
        self.support = model.cfg.support
        self.p = PFrameCoder(model)
        self.hyper = HyperCoder(model) if model.cfg.hyper else None
        self._pmfs: dict[int, np.ndarray] = {}
        self._models: dict[int, list] = {}

    def pmf(self, level: int) -> np.ndarray:
        """(C, 2R+1) float64 probabilities of the symbols -R..R for every channel."""
        if level not in self._pmfs:
            with torch.no_grad():
                params = (t[0].double() for t in self.model.prior(torch.tensor([level])))
                pmf = mixture_pmf(*params, self.support).numpy()
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

    def intra(self, y_hat: np.ndarray) -> tuple[np.ndarray, tuple | None]:
        """(the integer latent an I-frame codes for the rounded latent ``y_hat``, its coding parameters): clipped
        to the support, and with a hyperprior (v4) into the ranges of the tables its ẑ selects."""
        y_hat = self.clip(y_hat)
        return self.hyper.fit(y_hat, self.support) if self.hyper is not None else (y_hat, None)

    def bits(self, y_hat: np.ndarray, level: int, params: tuple | None = None) -> float:
        """Ideal code length −Σ log2 p(ŷ) in bits of an I-frame latent (C, h, w) under the coding tables
        (``params``: from :meth:`intra`, v4)."""
        if self.hyper is not None:
            return self.hyper.bits(y_hat, level, params if params is not None else self.intra(y_hat)[1])
        sym = (self.clip(y_hat) + self.support).reshape(y_hat.shape[0], -1).astype(np.int64)
        p = np.take_along_axis(self.pmf(level), sym, axis=1)
        return float(-np.log2(np.maximum(p, MIN_PROBABILITY)).sum())

    def encode(
        self,
        y_hat: np.ndarray,
        level: int,
        prev: np.ndarray | None = None,
        history: MotionHistory | None = None,
        params: tuple | None = None,
        check: int = SENTINEL,
    ) -> bytes:
        """Encode a clipped integer latent (C, h, w) to bytes (a whole number of 32-bit words): an I-frame,
        or a P-frame when the previous decoded latent ``prev`` (and the group's motion ``history``) is given
        (``params``: its :meth:`PFrameCoder.params`, or an I-frame's from :meth:`intra`, when already computed).
        ``check``: the 32-bit value the stream ends with (versions 3, 4:
        :func:`common.coding.bitstream.latent_checksum`).
        """
        coder = constriction.stream.stack.AnsCoder()
        push_check(coder, check)  # bottom of the stack: decoded last
        if prev is None and self.hyper is not None:
            self.hyper.encode(coder, y_hat, level, params if params is not None else self.intra(y_hat)[1])
        elif prev is None:
            models = self._categoricals(level)
            sym = (self.clip(y_hat) + self.support).astype(np.int32).reshape(y_hat.shape[0], -1)
            for c in reversed(range(sym.shape[0])):  # ANS is a stack: encode backwards, decode forwards
                coder.encode_reverse(sym[c], models[c])
        else:
            self.p.encode(coder, y_hat, params if params is not None else self.p.params(prev, history, level, y_hat))
        return coder.get_compressed().astype("<u4").tobytes()

    @torch.inference_mode()
    def decode(
        self,
        payload: bytes,
        level: int,
        shape: tuple[int, int, int],
        prev: np.ndarray | None = None,
        history: MotionHistory | None = None,
        check=None,
    ) -> np.ndarray:
        """Inverse of :meth:`encode`; ``check``: a function of the decoded latent giving the check value the
        stream must end with (None: the fixed sentinel). Raises FedlvcError when the payload does not decode
        to exactly ``shape`` with that check value."""
        if len(payload) % 4:
            raise FedlvcError("bitstream chunk is not a whole number of 32-bit words")
        c, h, w = shape
        words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
        try:
            coder = constriction.stream.stack.AnsCoder(words)
            if prev is None and self.hyper is not None:
                out = self.hyper.decode(coder, level, shape)
            elif prev is None:
                models = self._categoricals(level)
                out = np.stack([coder.decode(models[i], h * w) for i in range(c)]).astype(np.int64) - self.support
            else:
                out = self.p.decode(coder, prev, history, level, shape)
            hi, lo = (int(v) for v in coder.decode(_CHECK_MODEL, 2))
        except (ValueError, RuntimeError, AssertionError) as e:
            raise FedlvcError(f"bitstream chunk does not decode: {e}") from None
        out = out.reshape(c, h, w)
        if np.abs(out).max(initial=0) > self.support:
            raise FedlvcError("bitstream chunk is damaged (a latent value out of range)")
        if check is None and (hi << 16 | lo) != SENTINEL:
            raise FedlvcError(
                "bitstream chunk does not decode to the frame size in the header (forged or foreign stream)"
            )
        if check is not None and (hi << 16 | lo) != check(out):
            raise FedlvcError("bitstream chunk is damaged (checksum mismatch)")
        if not coder.is_empty():
            raise FedlvcError("bitstream chunk is damaged (data left over after decoding)")
        return out


def coding_fingerprint(model: FedlvcCodec) -> str:
    """SHA-256 (hex) of what the model's coding tables make of every symbol: at every quality level, each
    channel's I-frame table codes every symbol −R…R once, and the P-frame Laplace codes every symbol −R…R
    around 0 under every (channel, context) scale. The tables are computed in float64, whose last bits may
    differ between machines (torch's CPU kernels, libm); what the coder makes of them is quantized. Two
    machines with the same fingerprint for a model code and decode its streams alike."""
    import hashlib

    coder = LatentCoder(model)
    r = coder.support
    symbols = np.arange(-r, r + 1, dtype=np.int32)
    h = hashlib.sha256()
    if model.cfg.hyper:  # integer tables: their bytes are what the coder makes of them
        for t in coding_tables(model).to_tensors().values():
            h.update(t.numpy().tobytes())
    for level in range(model.cfg.num_levels):
        for table in [] if model.cfg.hyper else coder._categoricals(level):
            ans = constriction.stream.stack.AnsCoder()
            ans.encode_reverse(symbols + r, table)
            h.update(ans.get_compressed().tobytes())
        if model.cfg.temporal:
            scales = coder.p.scale_table(level).reshape(-1)
            ans = constriction.stream.stack.AnsCoder()
            ans.encode_reverse(
                np.tile(symbols, scales.size),
                coder.p._laplace,
                np.zeros(scales.size * symbols.size),
                np.repeat(scales, symbols.size),
            )
            h.update(ans.get_compressed().tobytes())
    return h.hexdigest()
