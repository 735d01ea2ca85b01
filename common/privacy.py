"""DP-SGD wiring in one place (Opacus): the training loop reads the same with DP on or off.

Privacy unit: one dataset row = one frame. Poisson sampling with rate q = batch / rows, per-sample
clipping to ``max_grad_norm``, Gaussian noise σ·C on every trainable parameter, and an accountant whose
history ``[(σ, q, steps), ...]`` is kept so ε can be recomputed by anyone and keeps adding up.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from .errors import FedlvcError

# Extend RDP orders: at small ε the optimum sits at the largest default order.
RDP_ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [64, 80, 96, 128, 160, 192, 256, 384, 512]


@dataclass(frozen=True)
class DPConfig:
    noise_multiplier: float  # σ; 0 means clipping only (no privacy)
    max_grad_norm: float = 1.0  # C, per-sample clipping norm
    delta: float = 1e-5
    accountant: str = "rdp"  # rdp | prv | gdp
    grad_sample_mode: str = "hooks"  # hooks | functorch ("ew" cannot take the level embeddings' 1-D input)

    def __post_init__(self):
        if self.noise_multiplier < 0:
            raise FedlvcError("noise multiplier must be >= 0")
        if self.max_grad_norm <= 0:
            raise FedlvcError("max grad norm must be > 0")
        if not 0 < self.delta < 1:
            raise FedlvcError("delta must be in (0, 1)")
        if self.grad_sample_mode not in ("hooks", "functorch"):
            raise FedlvcError(f"grad sample mode must be hooks or functorch, not {self.grad_sample_mode!r}")
        if self.accountant not in ("rdp", "prv", "gdp"):
            raise FedlvcError(f"accountant must be rdp, prv or gdp, not {self.accountant!r}")


def poisson_sample_rate(rows: int, batch_size: int) -> float:
    """The sampling rate Opacus' Poisson loader uses: 1 / (number of batches per epoch)."""
    return 1.0 / math.ceil(rows / batch_size)


def make_private(model, optimizer, loader, dp: DPConfig, history=None):
    """Wrap model/optimizer/loader for DP-SGD with Poisson sampling; continue ``history`` if given.

    Returns (engine, model, optimizer, loader)."""
    engine = PrivacyEngine(accountant=dp.accountant)
    if history:
        engine.accountant.history = [tuple(h) for h in history]
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        poisson_sampling=True,
        grad_sample_mode=dp.grad_sample_mode,
    )
    return engine, model, optimizer, loader


def fold_segment_grad_samples(model, batch: int, frames: int) -> None:
    """Turn per-frame gradient samples into per-segment ones after a backward pass of
    ``FedlvcCodec.forward_segment`` on ``batch`` segments of ``frames`` frames.

    Modules that ran on all frames hold ``batch·frames`` samples, the segment's frames consecutive; their
    sum is the segment's gradient. Opacus scaled each by its own row count (``loss_reduction="mean"``),
    ``batch·frames`` instead of ``batch``, hence the division by ``frames``. Modules that ran once per
    segment (the priors) already hold ``batch`` samples."""
    for p in model.parameters():
        gs = getattr(p, "grad_sample", None)
        if gs is None or frames == 1:
            continue
        if gs.shape[0] == batch * frames:
            p.grad_sample = gs.view(batch, frames, *gs.shape[1:]).sum(1) / frames
        elif gs.shape[0] != batch:
            raise RuntimeError(f"gradient sample of {tuple(gs.shape)} fits neither {batch} segments nor their frames")


def check_privacy_unit(recorded_frames: int, unit_frames: int, source: str, remedy: str) -> None:
    """Refuse to continue ``source``'s record, kept for privacy units of ``recorded_frames`` frames, with units
    of ``unit_frames``: ε per frame and ε per segment are different guarantees, they do not add up."""
    if recorded_frames != unit_frames:
        raise FedlvcError(f"{source} counts privacy units of {recorded_frames} frame(s); run-config asks for "
                          f"{unit_frames} (privacy-unit/segment-frames): {remedy}")


def epsilon_from_history(history, delta: float, accountant: str = "rdp") -> float:
    """ε of a recorded history ``[(σ, q, steps), ...]`` by a fresh accountant (inf without noise)."""
    if not history:
        return 0.0
    if any(float(s) == 0.0 for s, _, _ in history):
        return float("inf")
    acc = create_accountant(accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if accountant == "rdp":
            return float(acc.get_epsilon(delta, alphas=RDP_ALPHAS))
        return float(acc.get_epsilon(delta))


def plan_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                          accountant: str = "rdp") -> float:
    """σ that spends ``target_epsilon`` over ``steps`` DP-SGD steps at sampling rate ``sample_rate``."""
    if target_epsilon <= 0:
        raise FedlvcError("target epsilon must be > 0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps, accountant=accountant))
