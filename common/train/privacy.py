"""DP-SGD wiring in one place (Opacus): the training loop reads the same with DP on or off.

Privacy unit: one dataset row = one frame. Poisson sampling with rate q = batch / rows, per-sample
clipping to ``max_grad_norm``, Gaussian noise σ·C on every trainable parameter, and an accountant whose
history ``[(σ, q, steps), ...]`` is kept so ε can be recomputed by anyone and keeps adding up.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample import register_grad_sampler
from opacus.grad_sample.conv import compute_conv_grad_sample

from common.config import options as o
from common.config.options import DP_OPTIONS, check_fields
from common.errors import FedlvcError
from common.net.transforms import FiLM

# Extend RDP orders: at small ε the optimum sits at the largest default order.
RDP_ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [64, 80, 96, 128, 160, 192, 256, 384, 512]


@dataclass(frozen=True)
class DPConfig:
    noise_multiplier: float  # σ; 0 means clipping only (no privacy)
    max_grad_norm: float = o.MAX_GRAD_NORM.default  # C, per-sample clipping norm
    delta: float = o.DELTA.default
    accountant: str = o.ACCOUNTANT.default
    grad_sample_mode: str = o.GRAD_SAMPLE_MODE.default

    def __post_init__(self):
        check_fields(self, DP_OPTIONS, "DP setting")


def poisson_sample_rate(rows: int, batch_size: int) -> float:
    """The sampling rate Opacus' Poisson loader uses: 1 / (number of batches per epoch)."""
    return 1.0 / math.ceil(rows / batch_size)


def secure_generator(device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded with 64 bits from the operating system's entropy: DP noise and Poisson sampling
    drawn from it cannot be replayed by anyone who knows the run's seed (the server does). Opacus'
    ``secure_mode`` would use torchcsprng, which is not installable here."""
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(int.from_bytes(os.urandom(8), "little"))
    return gen


@register_grad_sampler(FiLM)
def film_grad_samples(layer: FiLM, activations, backprops: torch.Tensor) -> dict:
    """Per-sample gradients of a :class:`common.net.transforms.FiLM` adapter (a per-channel scale and shift): for
    sample n and channel c, Σ over positions of input × output gradient, and Σ of the output gradient. FiLM
    is a Conv2d subclass, which Opacus would otherwise hand to functorch (its sampler table is looked up by
    exact type): one vmapped convolution backward per layer, for what is one reduction. Indifferent to the
    memory layout."""
    x = activations[0]
    out = {}
    if layer.weight.requires_grad:
        out[layer.weight] = (x * backprops).sum((2, 3)).view(x.shape[0], *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.sum((2, 3))
    return out


@register_grad_sampler(torch.nn.Conv2d)
def conv2d_grad_samples(layer: torch.nn.Conv2d, activations, backprops: torch.Tensor) -> dict:
    """Opacus' convolution sampler on NCHW copies of its inputs: on channels_last tensors it returns wrong
    per-sample weight gradients (tests/test_dp_grad_samples.py), which would silently break the clipping
    bound. The copies are made once per sampled layer and step, so DP training may run channels_last like
    plain training (faster than NCHW on these CPUs even with the copies: docs/results.md, DP cost per trained
    part); on NCHW tensors they are no-ops and this is Opacus' sampler."""
    return compute_conv_grad_sample(layer, [a.contiguous() for a in activations], backprops.contiguous())


# Module types whose hooks-mode per-sample gradients are exact whatever the memory layout (tested on
# channels_last models and batches): our FiLM and Conv2d samplers, and Opacus' embedding sampler (its
# input is the 1-D quality levels, its gradients 2-D).
LAYOUT_SAFE = (FiLM, torch.nn.Conv2d, torch.nn.Embedding)


def layout_safe_samples(model: torch.nn.Module, grad_sample_mode: str = "hooks") -> bool:
    """Whether every module owning a trainable parameter is one whose per-sample gradients do not depend on
    the memory layout (:data:`LAYOUT_SAFE`, hooks mode): then DP training may run channels_last like plain
    training; a module of any other type (or functorch's samplers, not checked) keeps DP training NCHW."""
    owners = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    return grad_sample_mode == "hooks" and bool(owners) and all(type(m) in LAYOUT_SAFE for m in owners)


def make_private(model, optimizer, loader, dp: DPConfig, history=None):
    """Make model/optimizer/loader DP-SGD with Poisson sampling; continue ``history`` if given. Opacus hooks
    the model itself (``wrap_model=False``: no wrapper module, the state dict keeps its names); the returned
    hooks' ``cleanup()`` removes them. The noise and the Poisson sampling come from a :func:`secure_generator`
    of their own, never from torch's default generator (which the training seed sets).

    Returns (engine, hooks, optimizer, loader)."""
    engine = PrivacyEngine(accountant=dp.accountant)
    if history:
        engine.accountant.history = [tuple(h) for h in history]
    device = next(model.parameters()).device
    hooks, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        poisson_sampling=True,
        grad_sample_mode=dp.grad_sample_mode,
        noise_generator=secure_generator(device),
        wrap_model=False,
    )
    loader.batch_sampler.generator = secure_generator("cpu")  # Opacus' Poisson sampler draws from it per batch
    return engine, hooks, optimizer, loader


def fold_segment_grad_samples(model, batch: int, frames: int) -> None:
    """Turn per-frame gradient samples into per-segment ones after a backward pass of
    :func:`common.train.segments.forward_segment` on ``batch`` segments of ``frames`` frames.

    Modules that ran on all frames hold ``batch·frames`` samples, the segment's frames consecutive; their
    sum is the segment's gradient. Opacus scaled each by its own row count (``loss_reduction="mean"``),
    ``batch·frames`` instead of ``batch``, hence the division by ``frames``. A motion model's residual codec
    ran on the P-frames only (``batch·(frames−1)`` samples, likewise). Modules that ran once per segment (the
    priors, a motion model's intra transforms on the I-frames) already hold ``batch`` samples."""
    for p in model.parameters():
        gs = getattr(p, "grad_sample", None)
        if gs is None or frames == 1:
            continue
        per = next((k for k in (frames, frames - 1) if k > 1 and gs.shape[0] == batch * k), None)
        if per is not None:
            p.grad_sample = gs.view(batch, per, *gs.shape[1:]).sum(1) / per
        elif gs.shape[0] != batch:
            raise RuntimeError(f"gradient sample of {tuple(gs.shape)} fits neither {batch} segments nor their frames")


def check_privacy_unit(recorded_frames: int, unit_frames: int, source: str, remedy: str) -> None:
    """Refuse to continue ``source``'s record, kept for privacy units of ``recorded_frames`` frames, with units
    of ``unit_frames``: ε per frame and ε per segment are different guarantees, they do not add up."""
    if recorded_frames != unit_frames:
        raise FedlvcError(
            f"{source} counts privacy units of {recorded_frames} frame(s); run-config asks for "
            f"{unit_frames} (privacy-unit/segment-frames): {remedy}"
        )


MAX_HISTORY_ENTRIES = 10_000  # a ledger merges equal consecutive settings: far more than any real history
MAX_HISTORY_STEPS = 10**9  # steps of one entry


def checked_history(rows, source: str) -> list[tuple[float, float, int]]:
    """An accountant history ``[(σ, q, steps), ...]`` from its JSON form, refused (one FedlvcError naming
    ``source``) unless every entry is finite σ >= 0 (0: a non-private round, ε = ∞ from then on), 0 < q <= 1
    and an integer 0 < steps <= 10^9, with at most 10,000 entries: nothing in it can lower an ε below what
    the entries spent, or hang the accountant."""
    try:
        rows = list(rows)
        if len(rows) > MAX_HISTORY_ENTRIES:
            raise ValueError(f"{len(rows)} entries (at most {MAX_HISTORY_ENTRIES})")
        out = []
        for row in rows:
            s, q, n = row
            if isinstance(s, bool) or isinstance(q, bool) or isinstance(n, bool):
                raise ValueError(f"entry {list(row)} is not numbers")
            s, q = float(s), float(q)
            if not (math.isfinite(s) and s >= 0):
                raise ValueError(f"noise multiplier {s} is not a finite number >= 0")
            if not 0 < q <= 1:
                raise ValueError(f"sample rate {q} is not in (0, 1]")
            if isinstance(n, float) and not n.is_integer() or not 0 < int(n) <= MAX_HISTORY_STEPS:
                raise ValueError(f"steps {n} is not an integer in 1..{MAX_HISTORY_STEPS}")
            out.append((s, q, int(n)))
        return out
    except (ValueError, TypeError) as e:
        raise FedlvcError(f"{source} is malformed: {e}") from None


# What one ε may cost: Opacus' RDP analysis takes about 0.15 s per distinct (σ, q) with our orders, more as σ
# grows, and loops forever on some extreme (σ, q) (its series never falls below its stopping threshold); its
# PRV accountant takes 4 s for 10^4 steps of one setting, 12 s for 8 settings, 80 s for 10^5 steps and all
# memory at 10^6. So ε is computed from a bounded history; every bound only raises ε.
MAX_EXACT_SETTINGS = 32  # distinct (σ, q) an ε is computed from exactly
MIN_SIGMA, MAX_SIGMA = 0.1, 100.0  # σ below 0.1 counts as no noise (ε = ∞); above 100 as 100 (ε negligible)
MIN_RATE = 1e-9  # a smaller sampling rate counts as 1e-9
PRV_MAX_STEPS, PRV_MAX_SETTINGS = 10_000, 4  # beyond these the PRV ε is replaced by the (larger) RDP ε


def bounded_history(history) -> list[tuple[float, float, int]]:
    """The history within the accountant's safe range (σ < 0.1 as 0, i.e. ε = ∞; σ > 100 as 100; q < 1e-9
    as 1e-9), equal (σ, q) merged (composition adds up the steps of one setting, in any order), and — only
    when more than ``MAX_EXACT_SETTINGS`` settings remain — σ rounded down and q rounded up to a geometric
    grid, coarsened until at most that many remain. Each step only raises ε: the result is an upper bound
    computed in bounded time, and honest histories (a few settings in range) stay exact."""

    def merge(rows, step=None):
        out: dict[tuple[float, float], int] = {}
        for s, q, n in rows:
            s = 0.0 if s < MIN_SIGMA else min(s, MAX_SIGMA)
            q = max(q, MIN_RATE)
            if step is not None:
                s = MIN_SIGMA * 2 ** (math.floor(math.log2(s / MIN_SIGMA) / step) * step) if s else 0.0
                q = min(1.0, 2 ** (math.ceil(math.log2(q) / step) * step))
            out[(s, q)] = out.get((s, q), 0) + int(n)
        return [(s, q, n) for (s, q), n in out.items()]

    merged, step = merge((float(s), float(q), n) for s, q, n in history), 1 / 8  # a grid of 2^(1/8): 9 %
    while len(merged) > MAX_EXACT_SETTINGS:
        merged, step = merge(merged, step), step * 2
    return merged


def epsilon_from_history(history, delta: float, accountant: str = "rdp") -> float:
    """ε of a recorded history ``[(σ, q, steps), ...]`` by a fresh accountant (inf without noise, and inf
    where the accountant cannot bound it: an ε that cannot be computed is not a small one). Computed from
    :func:`bounded_history`; a PRV ε of a history too long for PRV's time and memory is the RDP ε."""
    if not history:
        return 0.0
    history = bounded_history(history)
    if any(s == 0.0 for s, _, _ in history):
        return float("inf")
    if accountant == "prv" and (sum(n for _, _, n in history) > PRV_MAX_STEPS or len(history) > PRV_MAX_SETTINGS):
        accountant = "rdp"
    acc = create_accountant(accountant)
    acc.history = history
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            eps = float(acc.get_epsilon(delta, alphas=RDP_ALPHAS) if accountant == "rdp" else acc.get_epsilon(delta))
        except (ValueError, RuntimeError, ArithmeticError, MemoryError):
            return float("inf")
    return eps if not math.isnan(eps) else float("inf")


def plan_noise_multiplier(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """σ that spends ``target_epsilon`` over ``steps`` DP-SGD steps at sampling rate ``sample_rate``."""
    if target_epsilon <= 0:
        raise FedlvcError("target epsilon must be > 0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
            )
        )
