"""Entropy coding of quantized latents (constriction's ANS coder): the factorized-prior I-frame coder, a model's
latent coders (:class:`LatentCoders`) and a frame's payload — one coder's latent on top of a 32-bit check value
(:func:`pack`, :func:`unpack`).

For quality level q and channel c the factorized prior's discretised pmf over the symbols ``k ∈ [-R, R]`` is
``CDF(k+½) − CDF(k−½)``, with the tails folded into the two end symbols, the same formula the training
loss uses for the rate. Tables are computed in float64 from the weights, so encoder and decoder that load
the same checkpoint build bit-identical models.
"""

from __future__ import annotations

import constriction
import numpy as np
import torch

from common.errors import FedlvcError
from common.net.model import FedlvcCodec
from common.net.priors import mixture_pmf

from .hypercoder import HyperCoder, coding_tables
from .latent import Condition, IntraCoder, LatentCodec
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


def _read_check(coder) -> int:
    hi, lo = (int(v) for v in coder.decode(_CHECK_MODEL, 2))
    return hi << 16 | lo


def pop_check(coder, expected: int) -> None:
    """Read the check value a payload ends with and refuse the chunk unless it is ``expected`` and nothing is
    left after it."""
    if _read_check(coder) != expected:
        raise FedlvcError("bitstream chunk is damaged (checksum mismatch)")
    if not coder.is_empty():
        raise FedlvcError("bitstream chunk is damaged (data left over after decoding)")


class FactorizedCoder(IntraCoder):
    """I-frames of a v1-v3 model under its factorized prior (a latent coder, :mod:`common.coding.latent`): per
    channel one table over the symbols −R..R; ``params``: the level."""

    def __init__(self, model: FedlvcCodec):
        super().__init__(model)
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

    def _symbols(self, latent: np.ndarray) -> np.ndarray:
        return (np.clip(latent, -self.support, self.support) + self.support).reshape(latent.shape[0], -1)

    def fit(self, y_hat: np.ndarray, condition: Condition) -> tuple[np.ndarray, int]:
        return np.clip(y_hat, -self.support, self.support), condition.level

    def bits(self, latent: np.ndarray, params: int) -> float:
        """Ideal code length −Σ log2 p(ŷ) in bits of an I-frame latent (C, h, w) at level ``params``."""
        p = np.take_along_axis(self.pmf(params), self._symbols(latent).astype(np.int64), axis=1)
        return float(-np.log2(np.maximum(p, MIN_PROBABILITY)).sum())

    def compress(self, ans, latent: np.ndarray, params: int) -> None:
        models = self._categoricals(params)
        sym = self._symbols(latent).astype(np.int32)
        for c in reversed(range(sym.shape[0])):  # ANS is a stack: encode backwards, decode forwards
            ans.encode_reverse(sym[c], models[c])

    def decompress(self, ans, condition: Condition, shape: tuple[int, int, int]) -> np.ndarray:
        c, h, w = shape
        models = self._categoricals(condition.level)
        return np.stack([ans.decode(models[i], h * w) for i in range(c)]).astype(np.int64) - self.support


class LatentCoders:
    """The latent coders of a model's latent frames: ``intra`` for I-frames (:class:`FactorizedCoder`, or
    :class:`HyperCoder` for v4) and ``p`` for P-frames (:class:`PFrameCoder`)."""

    def __init__(self, model: FedlvcCodec):
        self.intra = HyperCoder(model) if model.cfg.hyper else FactorizedCoder(model)
        self.p = PFrameCoder(model)

    def of(self, condition: Condition) -> LatentCodec:
        """The coder of a latent coded under ``condition``."""
        return self.intra if condition.intra else self.p

    def payload(self, y_hat: np.ndarray, condition: Condition, check: int = SENTINEL) -> bytes:
        """The payload of the integer latent ``y_hat`` as its coder fits it (:func:`pack`)."""
        codec = self.of(condition)
        return pack(codec, *codec.fit(y_hat, condition), check)

    def latent(self, payload: bytes, condition: Condition, shape: tuple[int, int, int], check=None) -> np.ndarray:
        """The latent of a payload coded under ``condition`` (:func:`unpack`)."""
        return unpack(self.of(condition), payload, condition, shape, check)


def payload_words(payload: bytes) -> np.ndarray:
    """The 32-bit ANS words of a payload; refused unless it is a whole number of them."""
    if len(payload) % 4:
        raise FedlvcError("bitstream chunk is not a whole number of 32-bit words")
    return np.frombuffer(payload, dtype="<u4").astype(np.uint32)


def pack(codec: LatentCodec, latent: np.ndarray, params, check: int = SENTINEL) -> bytes:
    """One frame's payload (a whole number of 32-bit words): the latent pushed by ``codec`` with ``params`` on
    top of the 32-bit ``check`` value (versions 3, 4: :func:`common.coding.bitstream.latent_checksum`)."""
    ans = constriction.stream.stack.AnsCoder()
    push_check(ans, check)  # bottom of the stack: decoded last
    codec.compress(ans, latent, params)
    return ans.get_compressed().astype("<u4").tobytes()


@torch.inference_mode()
def unpack(codec: LatentCodec, payload: bytes, condition: Condition, shape: tuple[int, int, int], check=None):
    """Inverse of :func:`pack`: the latent (C, h, w) int64. ``check``: a function of the decoded latent giving the
    check value the stream must end with (None: the fixed sentinel). Raises FedlvcError when the payload does not
    decode to exactly ``shape`` with that check value."""
    words = payload_words(payload)
    try:
        ans = constriction.stream.stack.AnsCoder(words)
        out = codec.decompress(ans, condition, shape)
        value = _read_check(ans)
    except (ValueError, RuntimeError, AssertionError) as e:
        raise FedlvcError(f"bitstream chunk does not decode: {e}") from None
    out = out.reshape(shape)
    if np.abs(out).max(initial=0) > codec.support:
        raise FedlvcError("bitstream chunk is damaged (a latent value out of range)")
    if check is None and value != SENTINEL:
        raise FedlvcError("bitstream chunk does not decode to the frame size in the header (forged or foreign stream)")
    if check is not None and value != check(out):
        raise FedlvcError("bitstream chunk is damaged (checksum mismatch)")
    if not ans.is_empty():
        raise FedlvcError("bitstream chunk is damaged (data left over after decoding)")
    return out


def coding_fingerprint(model: FedlvcCodec) -> str:
    """SHA-256 (hex) of what the model's coding tables make of every symbol: at every quality level, each
    channel's I-frame table codes every symbol −R…R once, and the P-frame Laplace codes every symbol −R…R
    around 0 under every (channel, context) scale. The tables are computed in float64, whose last bits may
    differ between machines (torch's CPU kernels, libm); what the coder makes of them is quantized. Two
    machines with the same fingerprint for a model code and decode its streams alike."""
    import hashlib

    coders = LatentCoders(model)
    r = model.cfg.support
    symbols = np.arange(-r, r + 1, dtype=np.int32)
    h = hashlib.sha256()
    if model.cfg.hyper:  # integer tables: their bytes are what the coder makes of them
        for t in coding_tables(model).to_tensors().values():
            h.update(t.numpy().tobytes())
    for level in range(model.cfg.num_levels):
        for table in [] if model.cfg.hyper else coders.intra._categoricals(level):
            ans = constriction.stream.stack.AnsCoder()
            ans.encode_reverse(symbols + r, table)
            h.update(ans.get_compressed().tobytes())
        if model.cfg.temporal:
            scales = coders.p.scale_table(level).reshape(-1)
            ans = constriction.stream.stack.AnsCoder()
            ans.encode_reverse(
                np.tile(symbols, scales.size),
                coders.p._laplace,
                np.zeros(scales.size * symbols.size),
                np.repeat(scales, symbols.size),
            )
            h.update(ans.get_compressed().tobytes())
    return h.hexdigest()
