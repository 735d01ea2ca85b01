"""Constant-memory check for long videos; prints one JSON line.

A generated static-camera clip of ``--long`` frames and one of ``--short`` frames are each written (FFV1),
compressed with ``fedlvc compress`` and decompressed with ``fedlvc decompress`` in a fresh process whose peak
resident memory (ru_maxrss) is reported. ``ratio`` = long peak / short peak: 1.0 means memory does not grow
with the number of frames.

    python benchmarks/long_video.py --short 100 --long 10000 [--width 64 --height 48] [--model CKPT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import resource, sys, time
from fractions import Fraction
from pathlib import Path
from client.cli import main
from common.data.clips import generate_site_clip
from common.data.video import write_video
frames, width, height, model, tmp = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], Path(sys.argv[5])
write_video(tmp / "in.mkv", generate_site_clip(0, 0, width, height, frames), Fraction(25))
extra = ["--model", model] if model else []
t0 = time.perf_counter()
assert main(["compress", str(tmp / "in.mkv"), str(tmp / "c.lvc"), "--quiet", *extra]) == 0
t1 = time.perf_counter()
assert main(["decompress", str(tmp / "c.lvc"), str(tmp / "out.mkv"), "--quiet", *extra]) == 0
t2 = time.perf_counter()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, t1 - t0, t2 - t1, (tmp / "c.lvc").stat().st_size)
"""


def measure(frames: int, width: int, height: int, model: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(frames), str(width), str(height), model, tmp],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
        rss_kb, enc_s, dec_s, size = out.stdout.strip().splitlines()[-1].split()
    return {
        "frames": frames,
        "peak_rss_mb": round(int(rss_kb) / 1024, 1),
        "encode_fps": round(frames / float(enc_s), 1),
        "decode_fps": round(frames / float(dec_s), 1),
        "lvc_bytes": int(size),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--short", type=int, default=100)
    ap.add_argument("--long", type=int, default=10000)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--height", type=int, default=48)
    ap.add_argument("--model", default="", help="checkpoint; default: the shipped model")
    args = ap.parse_args()
    start = time.time()
    short = measure(args.short, args.width, args.height, args.model)
    long = measure(args.long, args.width, args.height, args.model)
    print(
        json.dumps(
            {
                "benchmark": "long_video_memory",
                "short": short,
                "long": long,
                "ratio": round(long["peak_rss_mb"] / short["peak_rss_mb"], 3),
                "size": f"{args.width}x{args.height}",
                "wall_s": round(time.time() - start, 1),
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
            }
        )
    )


if __name__ == "__main__":
    main()
