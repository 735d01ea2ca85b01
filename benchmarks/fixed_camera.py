#!/usr/bin/env python
"""The fixed-camera site (issue 36, item 6): a site that films the same scene every day trains a personal model
on its past and codes what comes next with it.

The site's past (``--past``, default frames 0-39 of ``tree``, Debian opencv-doc's fixed outdoor camera) is written
losslessly to a folder, and the site trains on it as a site would, with ``fedlvc train --init-model SHARED`` and
no noise (the best checkpoint by validation on every 20th past frame; ``--segment-frames N``: on segments of N
frames, I+P, so that the P-frame prior learns the scene too). Then the shared and the personal model
code the held-out frames (``--test``, default 40-67) as ``benchmarks/rd.py`` does (``run_clip``: real ``.lvc``
files, every quality, I+P and intra-only) beside x264 medium and x264 intra-only on the same frames; BD-rates on
PSNR-RGB, personal against shared and each against x264. Prints one JSON line. ``--personal PATH`` keeps the
personal model (a second run with more ``--steps`` resumes its training).

    python benchmarks/fixed_camera.py [--clip tree] [--past 0-39] [--test 40-67] [--model SHARED] [--steps 500]
        [--personal PATH] [--threads N] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import _common as C
import rd


def train_personal(args, shared: Path, personal: Path, folder: Path) -> dict:
    """The site's own ``fedlvc train`` on its past frames (written losslessly to ``folder``), without noise."""
    from client.cli import main as fedlvc
    from common.checkpoint import read_meta
    from common.data.video import write_video

    start, n = C.frame_range(args.past, args.past)
    frames, fps, source = C.load_clip(args.clip, n, start=start)
    site = folder / "site"
    site.mkdir()
    write_video(site / "past.mkv", list(frames), fps)
    C.log(f"fixed_camera: training a personal model on {source}: {len(frames)} frames, {args.steps} steps")
    command = ["--threads", str(args.threads), "train", str(site), "--init-model", str(shared), "--out"]
    command += [str(personal), "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--crop-size"]
    command += [str(args.crop_size), "--lr", str(args.lr), "--validate-every", str(args.validate_every), "--quiet"]
    if args.segment_frames:  # rows of consecutive frames: the P-frame prior learns the scene too
        command += ["--privacy-unit", "segment", "--segment-frames", str(args.segment_frames)]
    if fedlvc(command) != 0:
        raise SystemExit("fedlvc train failed")
    return {"source": source, "frames": len(frames), "command": "fedlvc " + " ".join(command), **read_meta(personal)}


def measure(model_path: Path, args, baselines: list[str]) -> dict:
    """rd.py's measurement of the test frames with one model (and the baselines when given)."""
    from common.checkpoint import fingerprint, load_model

    start, n = C.frame_range(args.test, args.test)
    model = load_model(model_path)
    levels = list(range(1, model.cfg.num_levels + 1))
    crfs = tuple(int(c) for c in args.crfs.split(","))
    gops = (args.gop, 1) if model.cfg.temporal else (1,)
    clip = rd.run_clip(args.clip, n, model, levels, baselines, crfs, (320, 240), gops=gops, start=start)
    return {"model": str(model_path), "fingerprint": fingerprint(model).hex(), **clip}


def compare(shared: dict, personal: dict) -> dict:
    """BD-rates (%, PSNR-RGB, negative = fewer bits) of the personal curves against the shared ones, and of each
    against the baselines measured beside the shared model."""
    from common.eval.metrics import bd_rate

    def curve(points, codec):
        return sorted((p["bpp"], p["psnr"]) for p in points if p["codec"] == codec)

    def bd(anchor, test):
        value = bd_rate(anchor, test) if anchor and test else None
        return None if value is None else round(value, 2)

    out = {}
    for codec in ("fedlvc", "fedlvc-intra"):
        mine, theirs = curve(personal["points"], codec), curve(shared["points"], codec)
        out[f"personal {codec} vs shared {codec}"] = bd(theirs, mine)
    for base in dict.fromkeys(p["codec"] for p in shared["points"] if not p["codec"].startswith("fedlvc")):
        anchor = curve(shared["points"], base)
        for who, run in (("shared", shared), ("personal", personal)):
            out[f"{who} fedlvc vs {base}"] = bd(anchor, curve(run["points"], "fedlvc"))
    return out


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clip", default="tree", help="a named clip or a video path (default tree)")
    p.add_argument("--past", default="0-39", help="the site's past frames, FIRST-LAST (default 0-39)")
    p.add_argument("--test", default="40-67", help="the frames it codes, FIRST-LAST (default 40-67)")
    p.add_argument("--model", help="the shared model (default: the shipped one)")
    p.add_argument("--personal", help="where to keep the personal model (default: a temporary file)")
    p.add_argument("--steps", type=int, default=500, help="personal training steps (default 500)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4, help="personal learning rate (default 1e-4)")
    p.add_argument("--validate-every", type=int, default=50)
    p.add_argument(
        "--segment-frames", type=int, default=0, help="train on segments of this many frames (I+P), 0: on frames"
    )
    p.add_argument("--crfs", default="18,23,28,33,38,43,48", help="x264 crfs (default 18,23,28,33,38,43,48)")
    p.add_argument("--baselines", default="x264,x264-intra")
    p.add_argument("--gop", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="torch threads for training and coding (default 2)")
    p.add_argument("--out", help="also write the JSON (indented) to this file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    for frames in (args.past, args.test):  # a bad range fails before any work
        C.frame_range(frames, frames)
    with C.json_stdout() as emit, tempfile.TemporaryDirectory() as tmp:
        C.set_threads(args.threads)
        shared = C.model_path(args.model)
        personal = Path(args.personal) if args.personal else Path(tmp) / "personal.safetensors"
        training = train_personal(args, shared, personal, Path(tmp))
        baselines = [n.strip() for n in args.baselines.split(",") if n.strip()]
        runs = {"shared": measure(shared, args, baselines), "personal": measure(personal, args, [])}
        result = {
            "benchmark": "fixed_camera",
            "clip": args.clip,
            "past": args.past,
            "test": args.test,
            "personal_training": training,
            "bd_rate_percent": compare(runs["shared"], runs["personal"]),
            "top_psnr": {k: max(p["psnr"] for p in r["points"] if p["codec"] == "fedlvc") for k, r in runs.items()},
            "runs": runs,
            "hardware": C.hardware(),
        }
        result = C.clean(result)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        emit(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
