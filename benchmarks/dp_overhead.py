#!/usr/bin/env python
"""Cost of one DP-SGD step over one non-private step: same model, same fixed batch, same crop size.

Both sides are the training loop's own step (``common.train.training.Trainer.step``, which single-site training and
a federated round run): the private side with Opacus as training wires it (``common.train.privacy.make_private``:
Poisson sampling, per-sample clipping to C = 1 and Gaussian noise σ·C on Adam), the plain side with global
gradient-norm clipping. Poisson sampling only changes which rows form a batch, so to compare like with like
both sides are timed on one identical, fixed batch (the DP data loader is built but never iterated): forward
+ RD loss + backward + optimizer step. Each side uses the layout training uses for it: ``channels_last`` model
and batch (the batch converted inside the timed step), DP too where every trainable module's per-sample
gradients are exact on it (``common.train.privacy.layout_safe_samples``: the convolutions' sampler takes NCHW
copies, Opacus' own gets ``channels_last`` wrong, tests/test_dp_grad_samples.py), else NCHW for DP. Both
freeze what frame-row training cannot reach (the temporal prior) and start from the same weights.

Steps alternate (plain, DP, DP, plain, ...) so load changes hit both sides alike; ``--warmup`` steps of
each are excluded. The ratio is the median DP step time over the median plain step time. Prints one
JSON line.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import traceback
import warnings

import _common as C

MODES = ("hooks", "functorch")


def build_base_model(arg: str | None, fresh: str | None):
    """(model in train mode, description): a checkpoint's weights, or a fresh model of architecture ``fresh``
    (v3: ``CodecConfig()``, v4: ``CodecConfig.v4()``)."""
    from common.checkpoint import load_model
    from common.net.architecture import CodecConfig
    from common.net.model import FedlvcCodec

    if not fresh:
        path = C.model_path(arg)
        if arg or path.is_file():
            return load_model(path).train(), str(path)
    cfg = CodecConfig.v4() if fresh == "v4" else CodecConfig()
    return FedlvcCodec(cfg).train(), f"fresh {cfg.architecture} model (random init)"


def fixed_batch(batch: int, crop: int, num_levels: int, seed: int = 0):
    """Generated frames and one fixed batch of crops drawn from them."""
    import numpy as np
    import torch

    from common.data.clips import FrameCrops, generate_site_clip

    n = max(32, batch)
    frames = list(generate_site_clip(1, 0, max(320, crop), max(240, crop), n))
    ds = FrameCrops(frames, crop, num_levels, seed=seed)
    items = [ds[i % len(ds)] for i in range(batch)]
    x = torch.stack([t for t, _ in items]).contiguous()  # as the default collate gives it: NCHW
    levels = torch.stack([lv for _, lv in items])
    assert np.isfinite(x.numpy()).all()
    return frames, x, levels


class Stepper:
    """Times one step of the training loop itself (``common.train.training.Trainer.step``: the step training and a
    federated round take, DP or not, with its layout and clipping) on the fixed batch."""

    def __init__(self, trainer):
        self.trainer, self.params = trainer, trainer.params

    def __call__(self, x, levels) -> float:
        t0 = time.perf_counter()
        loss = self.trainer.step(x, levels)
        seconds = time.perf_counter() - t0
        if loss != loss:  # nan: a sample's loss was not finite
            raise FloatingPointError("non-finite loss")
        return seconds


def make_stepper(base, frames, crop: int, batch: int, lr: float, dp=None, parts: str = "all") -> Stepper:
    """A trainer over the same frames and start weights: plain (channels_last, Adam with gradient-norm
    clipping) or DP (channels_last where layout-safe, else NCHW; Opacus with Poisson sampling; its loader is
    built but never iterated); ``parts``:
    what it trains (``train-parts``)."""
    from common.net.model import with_adapters
    from common.train.training import TrainConfig, Trainer

    cfg = TrainConfig(crop_size=crop, batch_size=batch, learning_rate=lr, train_parts=parts)
    model = with_adapters(copy.deepcopy(base)) if parts == "adapters" else copy.deepcopy(base)
    return Stepper(Trainer(model, frames, cfg, dp=dp, fast_layout=True))


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


def measure_part(args, base, frames, x, levels, part: str) -> dict:
    """The DP step against the plain step when only ``part`` trains (the selected grad-sample mode)."""
    from common.train.privacy import DPConfig

    C.log(f"  parts {part}:")
    plain = make_stepper(base, frames, args.crop_size, args.batch_size, args.lr, parts=part)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp_cfg = DPConfig(noise_multiplier=args.noise_multiplier, grad_sample_mode=args.grad_sample_mode)
        dp = make_stepper(base, frames, args.crop_size, args.batch_size, args.lr, dp_cfg, part)
        m = measure(plain, dp, x, levels, args.steps, args.warmup)
    C.log(f"    ratio {m['ratio']:.2f}")
    return {
        "ratio": m["ratio"],
        "dp_step_seconds": m["dp_step_seconds"],
        "plain_step_seconds": m["plain_step_seconds"],
        "trainable_parameters": sum(p.numel() for p in plain.params),
        "dp_memory_format": dp_memory_format(dp),
    }


def dp_memory_format(stepper: Stepper) -> str:
    return "channels_last" if stepper.trainer.fast_layout else "contiguous"


def _result(args, per_mode: dict, base, source: str, params: int, trainable: int, hw: dict, wall: float):
    """(the JSON line, whether the selected mode was measured)."""
    import torch

    sel = per_mode[args.grad_sample_mode]
    ok = isinstance(sel, dict)
    result = {
        "benchmark": "dp_overhead",
        "ratio": sel["ratio"] if ok else None,
        "dp_step_seconds": sel["dp_step_seconds"] if ok else None,
        "plain_step_seconds": sel["plain_step_seconds"] if ok else None,
        "mode": args.grad_sample_mode,
        "error": None if ok else sel,
        "batch": args.batch_size,
        "crop": args.crop_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "statistic": "median step seconds over alternating (ABBA) plain/DP steps after warm-up",
        "noise_multiplier": args.noise_multiplier,
        "max_grad_norm": 1.0,
        "memory_format": {"dp": "see parts.<part>.dp_memory_format", "plain": "channels_last"},
        "trainable_parameters": trainable,
        "frozen": "temporal prior (set_trainable(model, 0))",
        "model_source": source,
        "parameters": params,
        "config": base.cfg.to_dict(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "opacus": __import__("opacus").__version__,
        "hardware": hw,
        "wall_seconds": wall,
    }
    if args.all_modes:
        result["modes"] = {
            m: (
                {
                    k: v
                    for k, v in r.items()
                    if not k.endswith("_seconds") or k in ("dp_step_seconds", "plain_step_seconds")
                }
                if isinstance(r, dict)
                else r
            )
            for m, r in per_mode.items()
        }
    elif ok:
        result["dp_seconds"], result["plain_seconds"] = sel["dp_seconds"], sel["plain_seconds"]
        result["ratio_of_minimums"] = sel["ratio_of_minimums"]
        result["ratio_median_of_pairs"] = sel["ratio_median_of_pairs"]
    return result, ok


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        help="initial weights (.safetensors); default: the shipped model if present, "
        "else a fresh CodecConfig() model (timings do not depend on the weights)",
    )
    p.add_argument(
        "--fresh",
        nargs="?",
        const="v3",
        choices=("v3", "v4"),
        help="use a freshly initialised model of this architecture (default v3: CodecConfig())",
    )
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
    p.add_argument(
        "--parts",
        default="all",
        help="comma list of trainable part sets (train-parts: all, entropy, adapters) measured one after the other; "
        "the first one gives the top-level ratio",
    )
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        p.error("--steps and --batch-size must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = _parse(argv)

    with C.json_stdout() as emit:
        import torch

        from common.train.privacy import DPConfig

        C.set_threads(args.threads)
        torch.manual_seed(args.seed)
        hw = C.hardware()
        base, source = build_base_model(args.model, args.fresh)
        if args.crop_size % base.cfg.stride:
            raise SystemExit(f"--crop-size must be a multiple of {base.cfg.stride}")
        frames, x, levels = fixed_batch(args.batch_size, args.crop_size, base.cfg.num_levels, args.seed)
        params = sum(p.numel() for p in base.parameters())
        C.log(
            f"dp_overhead: {source}, {params} parameters, batch {args.batch_size}, crop {args.crop_size}, "
            f"torch threads {torch.get_num_threads()}"
        )
        parts = [p.strip() for p in args.parts.split(",") if p.strip()]
        plain = make_stepper(base, frames, args.crop_size, args.batch_size, args.lr, parts=parts[0])
        trainable = sum(p.numel() for p in plain.params)

        modes = [args.grad_sample_mode] + ([m for m in MODES if m != args.grad_sample_mode] if args.all_modes else [])
        per_mode: dict[str, object] = {}
        first_layout = None
        t_start = time.perf_counter()
        for mode in modes:
            C.log(f"  mode {mode}:")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # Opacus' secure-RNG / poisson notices
                    dp = make_stepper(
                        base,
                        frames,
                        args.crop_size,
                        args.batch_size,
                        args.lr,
                        DPConfig(noise_multiplier=args.noise_multiplier, grad_sample_mode=mode),
                        parts[0],
                    )
                    per_mode[mode] = measure(plain, dp, x, levels, args.steps, args.warmup)
                    first_layout = dp_memory_format(dp)
                C.log(f"    ratio {per_mode[mode]['ratio']:.2f}")
            except Exception as e:  # report, do not crash: some modes do not support every layer/layout
                C.log(traceback.format_exc())
                per_mode[mode] = f"failed: {type(e).__name__}: {e}".splitlines()[0][:500]
            finally:
                dp = None

        result, ok = _result(args, per_mode, base, source, params, trainable, hw, time.perf_counter() - t_start)
        result["parts"] = {parts[0]: {k: result[k] for k in ("ratio", "dp_step_seconds", "plain_step_seconds")}}
        result["parts"][parts[0]]["trainable_parameters"] = trainable
        result["parts"][parts[0]]["dp_memory_format"] = first_layout
        for part in parts[1:]:
            result["parts"][part] = measure_part(args, base, frames, x, levels, part)
        emit(result)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
