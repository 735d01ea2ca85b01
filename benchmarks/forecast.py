#!/usr/bin/env python
"""The training forecast (issue 36): BD-rate of fedlvc against x264 on each clip, intra-only against x264
intra-only and I+P against x264 medium, for checkpoints along the training campaign, against each checkpoint's
cumulative training hours; a straight line through BD-rate over log2(hours) per series, and the hours where that
line reaches 0 %. Prints one JSON line; ``--plot`` draws the points and lines on a log axis.

Each input is a ``benchmarks/rd.py --out`` JSON of one checkpoint (``--model``); its hours are the checkpoint's
cumulative training wall time (``meta.total``, or the sum of ``meta.stages`` for the hand-assembled early ones:
``common.train.training.training_totals``). The fit is a forecast to decide from, not a promise: learned codecs gain
about a constant amount per doubling of training for a long while, then flatten.

python benchmarks/rd.py --model CKPT --clips carphone:60,bikes:30 --no-ms-ssim --crfs 18,23,28,33,38,43,48 \
    --out rd-CKPT.json      # one per checkpoint
python benchmarks/forecast.py rd-*.json --plot docs/forecast_v4.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import _common as C
from compare_rd import curves

SERIES = {"intra": ("fedlvc-intra", "x264-intra"), "I+P": ("fedlvc", "x264")}


def point(path: str) -> dict:
    """One checkpoint's hours, steps and BD-rates ({clip: {series: %}}) from its rd.py JSON."""
    from common.eval.metrics import bd_rate
    from common.train.training import training_totals

    doc = json.loads(Path(path).read_text())
    totals = training_totals(doc.get("model_meta") or {})
    bd = {}
    for clip, codecs in curves(path).items():
        row = {}
        for name, (ours, ref) in SERIES.items():
            if ours in codecs and ref in codecs:
                value = bd_rate(codecs[ref], codecs[ours])
                row[name] = None if value is None else round(value, 2)
        bd[Path(clip).stem] = row
    return {
        "run": path,
        "fingerprint": doc.get("model_fingerprint", "")[:12],
        "steps": totals["steps"],
        "hours": round(totals["wall_seconds"] / 3600, 3),
        "bd_rate_percent": bd,
    }


def fit(points: list[tuple[float, float]]) -> dict | None:
    """Least squares BD = a + b·log2(hours); the hours where it reaches 0 % (None when it does not fall)."""
    if len({h for h, _ in points}) < 2:
        return None
    xs, ys = [math.log2(h) for h, _ in points], [v for _, v in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    a = my - b * mx
    zero = round(2 ** (-a / b), 1) if b < 0 else None
    return {"per_doubling": round(b, 2), "at_1h": round(a, 2), "hours_to_zero": zero}


def plot(points: list[dict], fits: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (clip, series), f in fits.items():
        pts = [(p["hours"], p["bd_rate_percent"][clip][series]) for p in points if clip in p["bd_rate_percent"]]
        pts = [(h, v) for h, v in pts if v is not None]
        (line,) = ax.plot(*zip(*pts), "o" if f else "o:", label=f"{clip} {series}" + ("" if f else " (not fitted)"))
        if f:
            hs = [min(h for h, _ in pts), max(f["hours_to_zero"] or 0, max(h for h, _ in pts))]
            ax.plot(hs, [f["at_1h"] + f["per_doubling"] * math.log2(h) for h in hs], "--", color=line.get_color())
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("cumulative training hours (2-core CPU)")
    ax.set_ylabel("BD-rate vs x264 (%), PSNR-RGB")
    ax.set_title("codec v4: BD-rate against x264 over training (dashed: log-linear fit)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="rd.py --out JSONs, one per checkpoint")
    p.add_argument("--plot", help="PNG to draw")
    p.add_argument(
        "--fit",
        default="intra",
        help="comma list of the series to fit (intra, I+P; default intra: the I+P points also move whenever the "
        "P-frame stage is rerun, not with the hours alone)",
    )
    args = p.parse_args(argv)
    with C.json_stdout() as emit:
        points = sorted((point(r) for r in args.runs), key=lambda q: q["hours"])
        keys = sorted({(clip, s) for q in points for clip, row in q["bd_rate_percent"].items() for s in row})
        fits = {}
        for clip, series in keys:
            pts = [(q["hours"], q["bd_rate_percent"].get(clip, {}).get(series)) for q in points]
            fitted = series in args.fit.split(",")
            fits[(clip, series)] = fit([(h, v) for h, v in pts if v is not None and h > 0]) if fitted else None
        if args.plot:
            plot(points, fits, args.plot)
        emit(
            {
                "benchmark": "forecast",
                "points": points,
                "fits": {f"{clip} {series}": f for (clip, series), f in fits.items()},
                "model": "BD-rate = at_1h + per_doubling * log2(hours), least squares per clip and series",
                "plot": args.plot,
            }
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
