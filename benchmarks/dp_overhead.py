#!/usr/bin/env python
"""Cost of one DP-SGD step over one non-private step: same model, same fixed batch, same crop size.

The private side is wired exactly as training wires it (``common.privacy.make_private``: Opacus
``PrivacyEngine.make_private`` with Poisson sampling, per-sample clipping to C = 1 and Gaussian noise
σ·C on an Adam optimizer). Poisson sampling only changes which rows form a batch, so to compare like
with like both sides are timed on one identical, fixed batch fed directly to the model (the
DP data loader is built but never iterated): forward + RD loss + backward + optimizer step. Both sides
use the layout ``common.training`` uses for them: the DP model and batch stay in the default contiguous
NCHW layout (Opacus' convolution gradient sampler returns wrong per-sample gradients on ``channels_last``
tensors, tests/test_dp_grad_samples.py), the non-private model is ``channels_last`` and its batch is
converted to ``channels_last`` inside the timed step, as the training loop converts each batch. The
non-private step is the training loop's one (plain Adam with global gradient-norm clipping). Both sides
freeze what frame-row training cannot reach (``common.training.set_trainable(model, 0)``: the temporal
prior) and optimise only the remaining parameters. Both models start from the same weights.

Steps alternate (plain, DP, DP, plain, ...) so load changes hit both sides alike; ``--warmup`` steps of
each are excluded. The ratio is the median DP step time over the median plain step time. Prints one
JSON line.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

MODES = ("hooks", "functorch")


def build_base_model(arg: str | None, fresh: bool):
    """(model in train mode, description): a checkpoint's weights, or a fresh ``CodecConfig()`` model."""
    from common.checkpoint import load_model
    from common.model import CodecConfig, FedlvcCodec

    if not fresh:
        path = C.model_path(arg)
        if arg or path.is_file():
            return load_model(path).train(), str(path)
    return FedlvcCodec(CodecConfig()).train(), "fresh CodecConfig() (random init)"


def fixed_batch(batch: int, crop: int, num_levels: int, seed: int = 0):
    """A FrameCrops dataset over generated frames and one fixed batch drawn from it."""
    import numpy as np
    import torch

    from common.data import FrameCrops, generate_site_clip

    n = max(32, batch)
    frames = list(generate_site_clip(1, 0, max(320, crop), max(240, crop), n))
    ds = FrameCrops(frames, crop, num_levels, seed=seed)
    items = [ds[i % len(ds)] for i in range(batch)]
    x = torch.stack([t for t, _ in items]).contiguous()  # as the default collate gives it: NCHW
    levels = torch.stack([lv for _, lv in items])
    assert np.isfinite(x.numpy()).all()
    return ds, x, levels


class Stepper:
    """One optimizer step of a given kind on the fixed batch.

    ``model`` is the raw module the forward runs on (under DP: the module Opacus wrapped, as
    ``common.training`` calls it), ``params`` its trainable parameters, ``channels_last`` whether each
    batch is converted to that layout first (the non-private training loop does; DP training does not)."""

    def __init__(self, model, params, optimizer, loss_fn, private: bool, channels_last: bool,
                 clip_norm: float = 1.0):
        self.model, self.params, self.optimizer, self.loss_fn = model, params, optimizer, loss_fn
        self.private, self.channels_last, self.clip_norm = private, channels_last, clip_norm

    def __call__(self, x, levels) -> float:
        import torch

        t0 = time.perf_counter()
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(x, levels), x, levels).mean()
        loss.backward()
        if not self.private:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm)
        self.optimizer.step()
        seconds = time.perf_counter() - t0
        if not torch.isfinite(loss):
            raise FloatingPointError("non-finite loss")
        return seconds


def make_plain(base, lr):
    """The non-private side as ``common.training.train`` builds it: channels_last model, Adam over the
    parameters frame-row training reaches."""
    import torch

    from common.model import RateDistortion
    from common.training import set_trainable

    model = copy.deepcopy(base).to(memory_format=torch.channels_last).train()
    params = set_trainable(model, 0)
    return Stepper(model, params, torch.optim.Adam(params, lr=lr), RateDistortion(model.cfg.lambdas),
                   private=False, channels_last=True)


def make_dp(base, dataset, batch, mode, sigma, lr):
    import torch
    from torch.utils.data import DataLoader

    from common.model import RateDistortion
    from common.privacy import DPConfig, make_private
    from common.training import set_trainable

    # As common.training does under DP: no channels_last (Opacus' conv sampler is wrong on it), the
    # temporal prior frozen before make_private so Opacus only samples gradients of trainable parameters.
    model = copy.deepcopy(base).to(memory_format=torch.contiguous_format).train()  # a no-op on NCHW weights
    params = set_trainable(model, 0)
    optimizer = torch.optim.Adam(params, lr=lr)
    loader = DataLoader(dataset, batch_size=batch)
    dp = DPConfig(noise_multiplier=sigma, max_grad_norm=1.0, grad_sample_mode=mode)
    _, wrapped, optimizer, _ = make_private(model, optimizer, loader, dp)
    return Stepper(wrapped._module, params, optimizer, RateDistortion(base.cfg.lambdas), private=True,
                   channels_last=False)


def measure(plain, dp, x, levels, steps: int, warmup: int) -> dict:
    """Alternate plain/DP steps (ABBA order); returns per-step seconds after warm-up and the ratios."""
    tp, td = [], []
    for i in range(warmup + steps):
        order = (plain, dp) if i % 2 == 0 else (dp, plain)
        got = {id(s): s(x, levels) for s in order}
        if i >= warmup:
            tp.append(got[id(plain)])
            td.append(got[id(dp)])
            C.log(f"    step {i - warmup + 1}/{steps}: plain {tp[-1]:.3f}s  dp {td[-1]:.3f}s")
    return {
        "ratio": statistics.median(td) / statistics.median(tp),
        "dp_step_seconds": statistics.median(td),
        "plain_step_seconds": statistics.median(tp),
        "ratio_of_minimums": min(td) / min(tp),
        "ratio_median_of_pairs": statistics.median(d / p for d, p in zip(td, tp)),
        "dp_seconds": td,
        "plain_seconds": tp,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="initial weights (.safetensors); default: the shipped model if present, "
                                   "else a fresh CodecConfig() model (timings do not depend on the weights)")
    p.add_argument("--fresh", action="store_true", help="use a freshly initialised CodecConfig() model")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--crop-size", type=int, default=96)
    p.add_argument("--grad-sample-mode", default="hooks", choices=MODES)
    p.add_argument("--all-modes", action="store_true", help="also measure every grad_sample_mode (failures reported)")
    p.add_argument("--steps", type=int, default=6, help="timed steps of each kind (default 6)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each kind first (default 2)")
    p.add_argument("--noise-multiplier", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate of both optimizers")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        p.error("--steps and --batch-size must be >= 1, --warmup >= 0")

    with C.json_stdout() as emit:
        import torch

        C.set_threads(args.threads)
        torch.manual_seed(args.seed)
        hw = C.hardware()
        base, source = build_base_model(args.model, args.fresh)
        if args.crop_size % base.cfg.stride:
            raise SystemExit(f"--crop-size must be a multiple of {base.cfg.stride}")
        dataset, x, levels = fixed_batch(args.batch_size, args.crop_size, base.cfg.num_levels, args.seed)
        params = sum(p.numel() for p in base.parameters())
        C.log(f"dp_overhead: {source}, {params} parameters, batch {args.batch_size}, crop {args.crop_size}, "
              f"torch threads {torch.get_num_threads()}")
        plain = make_plain(base, args.lr)
        trainable = sum(p.numel() for p in plain.params)

        modes = [args.grad_sample_mode] + ([m for m in MODES if m != args.grad_sample_mode] if args.all_modes else [])
        per_mode: dict[str, object] = {}
        t_start = time.perf_counter()
        for mode in modes:
            C.log(f"  mode {mode}:")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # Opacus' secure-RNG / poisson notices
                    dp = make_dp(base, dataset, args.batch_size, mode, args.noise_multiplier, args.lr)
                    per_mode[mode] = measure(plain, dp, x, levels, args.steps, args.warmup)
                C.log(f"    ratio {per_mode[mode]['ratio']:.2f}")
            except Exception as e:  # report, do not crash: some modes do not support every layer/layout
                C.log(traceback.format_exc())
                per_mode[mode] = f"failed: {type(e).__name__}: {e}".splitlines()[0][:500]
            finally:
                dp = None

        sel = per_mode[args.grad_sample_mode]
        ok = isinstance(sel, dict)
        result = {
            "benchmark": "dp_overhead",
            "ratio": sel["ratio"] if ok else None,
            "dp_step_seconds": sel["dp_step_seconds"] if ok else None,
            "plain_step_seconds": sel["plain_step_seconds"] if ok else None,
            "mode": args.grad_sample_mode,
            "error": None if ok else sel,
            "batch": args.batch_size, "crop": args.crop_size, "steps": args.steps, "warmup": args.warmup,
            "statistic": "median step seconds over alternating (ABBA) plain/DP steps after warm-up",
            "noise_multiplier": args.noise_multiplier, "max_grad_norm": 1.0,
            "memory_format": {"dp": "contiguous", "plain": "channels_last"},
            "trainable_parameters": trainable, "frozen": "temporal prior (set_trainable(model, 0))",
            "model_source": source, "parameters": params, "config": base.cfg.to_dict(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "opacus": __import__("opacus").__version__, "hardware": hw,
            "wall_seconds": time.perf_counter() - t_start,
        }
        if args.all_modes:
            result["modes"] = {m: ({k: v for k, v in r.items() if not k.endswith("_seconds") or k in
                                    ("dp_step_seconds", "plain_step_seconds")} if isinstance(r, dict) else r)
                               for m, r in per_mode.items()}
        elif ok:
            result["dp_seconds"], result["plain_seconds"] = sel["dp_seconds"], sel["plain_seconds"]
            result["ratio_of_minimums"] = sel["ratio_of_minimums"]
            result["ratio_median_of_pairs"] = sel["ratio_median_of_pairs"]
        emit(result)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
