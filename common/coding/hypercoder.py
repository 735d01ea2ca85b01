"""I-frame coding of architecture v4 (:mod:`common.net.hyperprior`) with exact integer tables.

The coding tables are integers, derived once from the model and stored with it (``tables.*`` tensors in the
checkpoint, outside ``state_dict``, so FedAvg never averages them):

- the Gaussian conditional: one table per (scale index, eighth of the mean's fractional part), each the counts
  (summing to 2^16, every symbol at least 1) of the symbols −R…R around the mean's integer part, R = 7σ + 2;
  they depend only on the fixed scale list, not on the weights;
- the hyper-latent's factorized prior: per quality level and channel, the counts of the symbols
  −Z_SUPPORT…Z_SUPPORT, derived from the learned prior's weights (re-derived when those change).

The decoder reads both from the model file and never evaluates a float CDF; which table codes an element comes
from h_s's integer path. One I-frame payload is an ANS stack: [check value] [latent, grouped by table] [ẑ by
channel] — decoded top down: ẑ, the latent's tables from ẑ, the latent, the check value.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import constriction
import numpy as np
import torch

from common.errors import FedlvcError
from common.net.hyperprior import MEAN_FRACS, SCALE_LEVELS, Z_SUPPORT, scale_of_index, table_index
from common.net.priors import mixture_pmf

from .latent import Condition, IntraCoder

TABLE_BITS = 16
TABLE_TOTAL = 1 << TABLE_BITS
MAX_RADIUS = 255


def quantize_pmf(p: np.ndarray) -> np.ndarray:
    """Integer counts (int32) summing to 2^16, each at least 1, from probabilities ``p`` (..., n)."""
    p = np.asarray(p, dtype=np.float64)
    p = p / p.sum(-1, keepdims=True)
    n = p.shape[-1]
    counts = np.floor(p * (TABLE_TOTAL - n)).astype(np.int64) + 1
    top = p.argmax(-1)[..., None]
    rest = (TABLE_TOTAL - counts.sum(-1))[..., None]
    np.put_along_axis(counts, top, np.take_along_axis(counts, top, -1) + rest, -1)
    return counts.astype(np.int32)


def gaussian_radius(i: int) -> int:
    return min(MAX_RADIUS, math.ceil(7 * scale_of_index(i)) + 2)


def gaussian_tables() -> tuple[np.ndarray, list[np.ndarray]]:
    """(radius per scale index, counts of each table ``i·MEAN_FRACS + f``), from the fixed scale list."""
    radius = np.array([gaussian_radius(i) for i in range(SCALE_LEVELS)], dtype=np.int32)
    tables = []
    for i in range(SCALE_LEVELS):
        r, sigma = int(radius[i]), scale_of_index(i)
        edges = torch.arange(-r - 0.5, r + 1.0, 1.0, dtype=torch.float64)
        for f in range(MEAN_FRACS):
            cdf = torch.special.ndtr((edges - (f + 0.5) / MEAN_FRACS) / sigma)
            cdf[0], cdf[-1] = 0.0, 1.0  # the tails fold into the end symbols
            tables.append(quantize_pmf(torch.diff(cdf).clamp_min(0.0).numpy()))
    return radius, tables


def _source(model) -> bytes:
    """What the weight-dependent tables were derived from: a hash of the hyper-latent prior's weights."""
    return hashlib.sha256(model.z_prior.table.weight.detach().cpu().double().numpy().tobytes()).digest()


def z_tables(model) -> np.ndarray:
    """(levels, Z, 2·Z_SUPPORT+1) counts of the hyper-latent's factorized prior."""
    out = []
    with torch.no_grad():
        for level in range(model.cfg.num_levels):
            params = (t[0].double() for t in model.z_prior(torch.tensor([level])))
            out.append(quantize_pmf(mixture_pmf(*params, Z_SUPPORT).numpy()))
    return np.stack(out)


@dataclass
class CodingTables:
    radius: np.ndarray  # (SCALE_LEVELS,) int32
    gauss: list  # SCALE_LEVELS·MEAN_FRACS int32 arrays of 2·radius+1 counts
    z: np.ndarray  # (levels, Z, 2·Z_SUPPORT+1) int32
    source: bytes

    @classmethod
    def derive(cls, model) -> CodingTables:
        radius, gauss = gaussian_tables()
        return cls(radius, gauss, z_tables(model), _source(model))

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "tables.gauss_radius": torch.from_numpy(self.radius.copy()),
            "tables.gauss_counts": torch.from_numpy(np.concatenate(self.gauss)),
            "tables.z_counts": torch.from_numpy(self.z.copy()),
            "tables.source": torch.frombuffer(bytearray(self.source), dtype=torch.uint8),
        }

    @classmethod
    def from_tensors(cls, t: dict, model) -> CodingTables:
        """Tables read from a checkpoint, checked: every shape, every table summing to 2^16 with no zero count,
        the radii those of the scale list, derived from these weights."""
        try:
            radius = t["tables.gauss_radius"].numpy().astype(np.int32)
            counts = t["tables.gauss_counts"].numpy().astype(np.int64)
            z = t["tables.z_counts"].numpy().astype(np.int64)
            source = bytes(t["tables.source"].numpy().astype(np.uint8))
        except KeyError as e:
            raise FedlvcError(f"the model's coding tables are missing ({e.args[0]})") from None
        expected = [gaussian_radius(i) for i in range(SCALE_LEVELS)]
        if radius.tolist() != expected:
            raise FedlvcError("the model's coding tables do not match its scale list")
        sizes = np.repeat(2 * radius.astype(np.int64) + 1, MEAN_FRACS)
        zshape = (model.cfg.num_levels, model.cfg.hyper_channels, 2 * Z_SUPPORT + 1)
        if counts.shape != (sizes.sum(),) or z.shape != zshape:
            raise FedlvcError("the model's coding tables have the wrong size")
        gauss = np.split(counts, np.cumsum(sizes)[:-1])
        for table in [*gauss, *z.reshape(-1, zshape[-1])]:
            if table.min() < 1 or table.sum() != TABLE_TOTAL:
                raise FedlvcError("the model's coding tables are damaged (a table does not sum to 2^16)")
        if source != _source(model):
            raise FedlvcError("the model's coding tables were derived from other weights")
        return cls(radius, [g.astype(np.int32) for g in gauss], z.astype(np.int32), source)


def coding_tables(model) -> CodingTables:
    """The model's integer tables: those loaded with it, else derived now (and kept) — again whenever the
    hyper-latent prior's weights have changed since (training)."""
    tables = getattr(model, "_coding_tables", None)
    if tables is None or tables.source != _source(model):
        tables = CodingTables.derive(model)
        model._coding_tables = tables
    return tables


def _categorical(counts: np.ndarray):
    return constriction.stream.model.Categorical(counts.astype(np.float64) / TABLE_TOTAL, perfect=False)


class HyperParams(NamedTuple):
    """How an I-frame latent of a v4 model is coded: the level, ẑ (Z, h', w') int64 and, per element of the latent
    (flattened, channel order), its table, the integer part of its mean and its table's radius."""

    level: int
    z_hat: np.ndarray
    table: np.ndarray
    offset: np.ndarray
    radius: np.ndarray


class HyperCoder(IntraCoder):
    """Codes I-frame latents of a v4 model under the integer tables (a latent coder, :mod:`common.coding.latent`):
    ẑ under its factorized prior, then the latent under the Gaussian table of each element, which ẑ selects
    through h_s's integer path. The tables are read on first use (training needs only :meth:`training_bits`)."""

    def __init__(self, model):
        super().__init__(model)
        self._gauss: dict[int, object] = {}
        self._z: dict[int, list] = {}

    @cached_property
    def tables(self) -> CodingTables:
        return coding_tables(self.model)

    @cached_property
    def _layers(self) -> list:
        return self.model.h_s.integer_layers()

    # ----------------------------------------------------------------------------------------- encoder side

    @torch.no_grad()
    def hyper_latent(self, y_hat: np.ndarray) -> np.ndarray:
        """ẑ (Z, h', w') int64 of an integer latent (C, h, w): what the encoder codes first."""
        z = self.model.h_a(torch.from_numpy(y_hat).float()[None])
        return torch.round(z).clamp(-Z_SUPPORT, Z_SUPPORT)[0].numpy().astype(np.int64)

    def _element_tables(self, z_hat: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(table, offset, radius) of every element of the latent (flattened, channel order) from ẑ."""
        mean_q, log_scale_q = self.model.h_s.integer_forward(torch.from_numpy(z_hat)[None], shape[1:], self._layers)
        table, offset = table_index(mean_q[0], log_scale_q[0])
        table, offset = table.reshape(-1).numpy(), offset.reshape(-1).numpy()
        return table, offset, self.tables.radius[table // MEAN_FRACS].astype(np.int64)

    def fit(self, y_hat: np.ndarray, condition: Condition) -> tuple[np.ndarray, HyperParams]:
        """The latent the encoder codes (``y_hat`` brought into ±support, where the decoder accepts it, and into
        its tables' ranges) and its coding parameters."""
        y_hat = np.clip(y_hat, -self.support, self.support)
        z_hat = self.hyper_latent(y_hat)
        table, offset, radius = self._element_tables(z_hat, y_hat.shape)
        lo, hi = np.maximum(offset - radius, -self.support), np.minimum(offset + radius, self.support)
        if (lo > hi).any():
            raise FedlvcError("this model's hyperprior puts latent means out of range: it cannot code this frame")
        fitted = np.clip(y_hat.reshape(-1), lo, hi).reshape(y_hat.shape)
        return fitted, HyperParams(condition.level, z_hat, table, offset, radius)

    # --------------------------------------------------------------------------------------------- coding

    def _gauss_model(self, t: int):
        if t not in self._gauss:
            self._gauss[t] = _categorical(self.tables.gauss[t])
        return self._gauss[t]

    def _z_models(self, level: int) -> list:
        if level not in self._z:
            self._z[level] = [_categorical(c) for c in self.tables.z[level]]
        return self._z[level]

    @staticmethod
    def _groups(table: np.ndarray):
        order = np.argsort(table, kind="stable")
        bounds = np.flatnonzero(np.diff(table[order])) + 1
        return order, np.split(order, bounds)

    def compress(self, ans, latent: np.ndarray, params: HyperParams) -> None:
        """Push an I-frame latent (fitted by :meth:`fit`) and its ẑ onto ``ans``."""
        sym = latent.reshape(-1) - params.offset + params.radius
        if sym.min() < 0 or (sym > 2 * params.radius).any():
            raise ValueError("latent outside its coding tables (call fit first)")
        _, groups = self._groups(params.table)
        for g in reversed(groups):
            ans.encode_reverse(sym[g].astype(np.int32), self._gauss_model(int(params.table[g[0]])))
        zs = (params.z_hat + Z_SUPPORT).reshape(params.z_hat.shape[0], -1).astype(np.int32)
        models = self._z_models(params.level)
        for c in reversed(range(zs.shape[0])):
            ans.encode_reverse(zs[c], models[c])

    def decompress(self, ans, condition: Condition, shape: tuple[int, int, int]) -> np.ndarray:
        c, h, w = shape
        zh, zw = -(-h // 4), -(-w // 4)
        models = self._z_models(condition.level)
        z_hat = np.stack([ans.decode(models[i], zh * zw) for i in range(len(models))]).astype(np.int64)
        table, offset, radius = self._element_tables(z_hat.reshape(-1, zh, zw) - Z_SUPPORT, shape)
        sym = np.empty(table.size, dtype=np.int64)
        _, groups = self._groups(table)
        for g in groups:
            sym[g] = ans.decode(self._gauss_model(int(table[g[0]])), g.size)
        return (sym - radius + offset).reshape(shape)

    def bits(self, latent: np.ndarray, params: HyperParams) -> float:
        """Ideal code length in bits of the latent and ẑ under the integer tables."""
        sym = latent.reshape(-1) - params.offset + params.radius
        total = 0.0
        for g in self._groups(params.table)[1]:
            counts = self.tables.gauss[int(params.table[g[0]])]
            total -= np.log2(counts[sym[g]] / TABLE_TOTAL).sum()
        zs = (params.z_hat + Z_SUPPORT).reshape(params.z_hat.shape[0], -1)
        probs = np.take_along_axis(self.tables.z[params.level], zs, axis=1) / TABLE_TOTAL
        return float(total - np.log2(probs).sum())
