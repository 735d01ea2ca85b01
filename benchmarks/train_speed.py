#!/usr/bin/env python
"""Training throughput of the codec: crop pixels per second of the training loop's own step
(``common.train.training.Trainer.step``: forward, RD loss, backward, gradient-norm clipping, Adam) at several
settings, each against the baseline setting measured in the same run.

A setting is ``BATCHxCROP`` (``8x128``: batches of 8 crops of 128²), optionally with ``+compile``
(``torch.compile`` of the model's forward). Every setting trains its own copy of the same start weights on
crops of the same frames (the photo corpus' training clips when ``--clips`` is given, else generated ones).
Steps are interleaved round-robin (one step of each setting, then the next round, the order rotated each
round) so that a change of load hits every setting alike; ``--warmup`` rounds are excluded (compilation
happens there). Reported per setting: the median step seconds, crop pixels per second, and the ratio of its
pixels per second to the first setting's. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import _common as C


def parse_setting(text: str) -> dict:
    """``"16x128+compile"`` → {"batch": 16, "crop": 128, "compile": True}."""
    body, _, extra = text.partition("+")
    batch, _, crop = body.partition("x")
    if not (batch.isdigit() and crop.isdigit()) or extra not in ("", "compile"):
        raise argparse.ArgumentTypeError(f"a setting is BATCHxCROP[+compile], not {text!r}")
    return {"name": text, "batch": int(batch), "crop": int(crop), "compile": extra == "compile"}


def training_frames(clips: str | None, count: int, seed: int):
    """Frames to crop from: ``count`` frames of the videos under ``clips``, or generated ones (320×256)."""
    import numpy as np

    if clips:
        from common.data.clips import find_videos, load_clips

        frames = [f for c in load_clips(find_videos([clips]), 1, 4) for f in c]
        rng = np.random.default_rng(seed)
        return [frames[i] for i in rng.choice(len(frames), size=min(count, len(frames)), replace=False)]
    from common.data.clips import generate_site_clip

    return list(generate_site_clip(1, 0, 320, 256, count))


def make_trainer(base, frames, setting: dict, lr: float, seed: int):
    """A trainer of the training loop over its own copy of ``base``; ``compile``: its forward compiled."""
    import torch

    from common.train.training import TrainConfig, Trainer

    cfg = TrainConfig(batch_size=setting["batch"], crop_size=setting["crop"], learning_rate=lr, seed=seed)
    trainer = Trainer(copy.deepcopy(base).train(), frames, cfg, fast_layout=True)
    if setting["compile"]:
        compiled, forward = torch.compile(trainer.model), trainer.forward
        trainer.forward = lambda m, x, lv: forward(compiled, x, lv)
    return trainer


def measure(trainers: list, rounds: int, warmup: int) -> list[list[float]]:
    """Seconds of each trainer's steps, interleaved round-robin with the order rotated each round."""
    streams = [t.batches(rounds + warmup) for t in trainers]
    times = [[] for _ in trainers]
    for r in range(warmup + rounds):
        order = list(range(len(trainers)))
        order = order[r % len(order) :] + order[: r % len(order)]
        for i in order:
            x, levels = next(streams[i])
            t0 = time.perf_counter()
            trainers[i].step(x, levels)
            if r >= warmup:
                times[i].append(time.perf_counter() - t0)
        C.log(f"  round {r + 1}/{warmup + rounds}" + (" (warm-up)" if r < warmup else ""))
    return times


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="start weights (.safetensors); default: the shipped model")
    p.add_argument(
        "--settings",
        default="8x128,16x128,32x128,8x256",
        help="comma list of BATCHxCROP[+compile]; the first is the baseline (default 8x128,16x128,32x128,8x256)",
    )
    p.add_argument("--clips", help="a folder of training videos (the photo corpus' clips); default: generated")
    p.add_argument("--frames", type=int, default=64, help="frames to crop from (default 64)")
    p.add_argument("--rounds", type=int, default=6, help="timed rounds (default 6)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        args.settings = [parse_setting(s) for s in args.settings.split(",")]
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    if args.rounds < 1 or args.warmup < 0:
        p.error("--rounds must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    with C.json_stdout() as emit:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        hw, started = C.hardware(), time.perf_counter()
        base = C.load_model(args.model)
        frames = training_frames(args.clips, args.frames, args.seed)
        trainers = [make_trainer(base, frames, s, args.lr, args.seed) for s in args.settings]
        times = measure(trainers, args.rounds, args.warmup)
        results, baseline = {}, None
        for s, t in zip(args.settings, times):
            step = statistics.median(t)
            pixels = s["batch"] * s["crop"] ** 2 / step
            baseline = baseline or pixels
            results[s["name"]] = {
                "step_seconds": step,
                "megapixels_per_second": pixels / 1e6,
                "ratio": pixels / baseline,
                "seconds": t,
            }
        emit(
            {
                "benchmark": "train_speed",
                "baseline": args.settings[0]["name"],
                "settings": results,
                "statistic": "median step seconds over interleaved rounds after warm-up; ratio of crop pixels/s",
                **C.model_info(args.model, base),
                "frames": args.clips or "generated site 1 (320x256)",
                "rounds": args.rounds,
                "warmup": args.warmup,
                "threads": torch.get_num_threads(),
                "hardware": hw,
                "wall_seconds": time.perf_counter() - started,
            }
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
