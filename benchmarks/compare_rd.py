#!/usr/bin/env python
"""BD-rates between the curves of ``benchmarks/rd.py`` JSON outputs (``--out``): within one run, every codec against
every other (fedlvc intra-only against x264 intra-only, for instance, which rd.py's own table does not show); with
two runs of the same clips (``--against``), each fedlvc curve of the first against the same curve of the second
(a new model against the shipped one), over the PSNR range both share. Prints one JSON line.

python benchmarks/rd.py --model NEW.safetensors --out new.json ...   # and the same command without --model
python benchmarks/compare_rd.py new.json --against old.json
python benchmarks/compare_rd.py new-a.json new-b.json --against old.json   # a model measured in two runs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import _common as C


def curves(path: str | Path) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """{clip source name: {codec: sorted [(bpp, psnr)]}} of an rd.py JSON."""
    doc = json.loads(Path(path).read_text())
    clips = doc["clips"] if isinstance(doc["clips"], list) else list(doc["clips"].values())
    out = {}
    for clip in clips:
        by: dict[str, list] = {}
        for p in clip["points"]:
            by.setdefault(p["codec"], []).append((p["bpp"], p["psnr"]))
        out[Path(clip["source"]).name] = {k: sorted(v) for k, v in by.items()}
    return out


def curves_of(paths: list[str]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """:func:`curves` of several rd.py runs of one model (different clips, e.g. a long run split in two)."""
    out: dict = {}
    for path in paths:
        out.update(curves(path))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", nargs="+", help="rd.py --out JSONs of one model (their clips together)")
    p.add_argument(
        "--against", nargs="+", help="rd.py --out JSONs of another model on the same clips (e.g. the shipped model's)"
    )
    args = p.parse_args(argv)
    with C.json_stdout() as emit:
        from common.eval.metrics import bd_rate

        def bd(anchor, test):
            value = bd_rate(anchor, test)
            return None if value is None else round(value, 2)

        ours = curves_of(args.run)
        result = {"benchmark": "compare_rd", "run": " ".join(args.run), "clips": {}}
        for clip, codecs in ours.items():
            row = {
                "bd_rate_percent": {
                    f"{test} vs {ref}": bd(codecs[ref], codecs[test])
                    for test in ("fedlvc", "fedlvc-intra")
                    for ref in codecs
                    if ref != test and test in codecs and not ref.startswith("fedlvc")
                },
                "top_psnr": {k: round(max(q for _, q in v), 2) for k, v in codecs.items() if k.startswith("fedlvc")},
            }
            result["clips"][clip] = row
        if args.against:
            result["against"] = " ".join(args.against)
            theirs = curves_of(args.against)
            for clip, row in result["clips"].items():
                if clip in theirs:
                    row["vs_against"] = {
                        codec: bd(theirs[clip][codec], ours[clip][codec])
                        for codec in ("fedlvc", "fedlvc-intra")
                        if codec in ours[clip] and codec in theirs[clip]
                    }
                    row["top_psnr_against"] = {
                        k: round(max(q for _, q in v), 2) for k, v in theirs[clip].items() if k.startswith("fedlvc")
                    }
        emit(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
