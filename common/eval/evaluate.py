"""``fedlvc evaluate``: rate–distortion of every quality level on a clip, against x264/x265 on the same frames.

fedlvc's rate is the size of the real ``.lvc`` file (header included) written by the same code as
``fedlvc compress``; distortion is measured on the frames decoded back from that file.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.checkpoint import fingerprint
from common.codec import DEFAULT_GOP, check_gop, decode_stream, encode_frames
from common.config.options import PFrameRule
from common.data.baselines import BASELINES, DEFAULT_CRFS, encode_baseline
from common.data.video import atomic_output, probe, read_frames
from common.errors import FedlvcError
from common.net.model import FedlvcCodec

from .metrics import bd_rate, ms_ssim, psnr_rgb


def code_and_measure(
    frames: np.ndarray,
    model: FedlvcCodec,
    quality: int,
    fps,
    gop: int = 1,
    rule: PFrameRule | None = None,
    similarity=ms_ssim,
) -> tuple[dict, np.ndarray]:
    """Code ``frames`` (N, H, W, 3) uint8 through a real ``.lvc`` file (fedlvc compress's code: groups of
    ``gop``, P-frames chosen by ``rule``, None: its default) and decode them back: (measurements, decoded).
    The rate is the file's size; PSNR-RGB and ``similarity(frames, decoded)`` (MS-SSIM by default; None: not
    measured) are taken on the decoded frames. Measurements: the encoder's summary, ``psnr``, ``ms_ssim``,
    ``encode_seconds`` and ``decode_seconds``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip.lvc"
        t0 = time.perf_counter()
        summary = encode_frames(iter(frames), path, model, quality, fps, gop, rule=rule)
        t1 = time.perf_counter()
        _, it = decode_stream(path, model)
        decoded = np.stack(list(it))
        t2 = time.perf_counter()
    return {
        "summary": summary,
        "psnr": psnr_rgb(frames, decoded),
        "ms_ssim": similarity(frames, decoded) if similarity else None,
        "encode_seconds": t1 - t0,
        "decode_seconds": t2 - t1,
    }, decoded


def fedlvc_points(
    frames: np.ndarray,
    model: FedlvcCodec,
    qualities,
    fps,
    keep_decoded=(),
    gop: int = 1,
    codec: str = "fedlvc",
    rule: PFrameRule | None = None,
    similarity=ms_ssim,
):
    """:func:`code_and_measure` at each quality; returns (points, decoded frames by quality)."""
    points, decoded_by_q = [], {}
    for q in qualities:
        m, decoded = code_and_measure(frames, model, q, fps, gop, rule, similarity)
        summary = m["summary"]
        points.append(
            {
                "codec": codec,
                "gop": gop,
                "quality": q,
                "bytes": summary["bytes"],
                "bpp": summary["bpp"],
                "i_frame_bytes": summary["chunk_bytes_by_type"]["I"],
                "p_frame_bytes": summary["chunk_bytes_by_type"]["P"],
                "i_frames": summary["frames_by_type"]["I"],
                "p_frames": summary["frames_by_type"]["P"],
                "ideal_bpp": summary["ideal_bpp"],
                "psnr": m["psnr"],
                "ms_ssim": m["ms_ssim"],
                "encode_fps": len(frames) / m["encode_seconds"],
                "decode_fps": len(frames) / m["decode_seconds"],
            }
        )
        if q in keep_decoded:
            decoded_by_q[q] = decoded
    return points, decoded_by_q


def baseline_points(frames: np.ndarray, fps, names=tuple(BASELINES), crfs=DEFAULT_CRFS, keep=None, similarity=ms_ssim):
    points, kept = [], {}
    for name in names:
        for crf in crfs:
            r = encode_baseline(frames, name, crf, fps)
            points.append(
                {
                    "codec": name,
                    "crf": crf,
                    "bytes": r.bytes,
                    "bpp": r.bpp,
                    "psnr": psnr_rgb(frames, r.decoded),
                    "ms_ssim": similarity(frames, r.decoded) if similarity else None,
                    "encode_fps": len(frames) / r.encode_seconds,
                }
            )
            if keep and (name, crf) == keep:
                kept[(name, crf)] = r.decoded
    return points, kept


def bd_rates(points: list[dict], test: str = "fedlvc") -> dict:
    """BD-rate (%, PSNR-RGB) of ``test`` against every other codec in ``points``."""
    by_codec: dict[str, list] = {}
    for p in points:
        by_codec.setdefault(p["codec"], []).append((p["bpp"], p["psnr"]))
    return {name: bd_rate(curve, by_codec[test]) for name, curve in by_codec.items() if name != test}


def fedlvc_codec_names(model: FedlvcCodec, gops=None) -> dict[int, str]:
    """{gop: codec name}: by default I+P at the default group length as "fedlvc" and intra-only as
    "fedlvc-intra" (an intra-only model: just "fedlvc", gop 1)."""
    gops = list(gops or ([DEFAULT_GOP, 1] if model.cfg.temporal else [1]))
    names = {}
    for i, g in enumerate(dict.fromkeys(gops)):
        names[g] = "fedlvc" if i == 0 else ("fedlvc-intra" if g == 1 else f"fedlvc-gop{g}")
    return names


@dataclass
class Evaluation:
    """What :func:`evaluate_clip` measured: the report (JSON-ready), the clip's frames, fedlvc's decoded frames
    at the grid's qualities and x264's at its middle crf (for :func:`write_evaluation`'s pictures)."""

    report: dict
    frames: np.ndarray
    decoded: dict  # quality → decoded frames
    kept: dict  # (baseline, crf) → decoded frames
    grid_qualities: list


def check_output_folders(*paths) -> None:
    """Refuse outputs in folders that do not exist, before any work is done."""
    for out in paths:
        if out is not None and not Path(out).parent.is_dir():
            raise FedlvcError(f"output folder does not exist: {Path(out).parent}")


def evaluate_clip(path, model: FedlvcCodec, max_frames=None, qualities=None, crfs=None, gop=None, progress=False):
    """``fedlvc evaluate``: every quality (I+P and intra-only by default) and x264/x265 at ``crfs`` on the same
    frames of ``path``; returns an :class:`Evaluation`."""
    qualities = list(qualities or range(1, model.cfg.num_levels + 1))
    for q in qualities:
        model.check_level(q - 1)
    crfs = tuple(crfs or DEFAULT_CRFS)
    names = fedlvc_codec_names(model, gop)
    for g in names:
        check_gop(model, g)
    info = probe(path)
    frames = read_frames(path, max_frames)
    grid_q = sorted({qualities[0], qualities[len(qualities) // 2], qualities[-1]})
    ours, theirs, decoded, kept = [], [], {}, {}
    steps = len(qualities) * len(names) + len(BASELINES) * len(crfs)
    with tqdm(total=steps, desc="evaluate", unit="point", disable=not progress) as bar:
        for i, (g, name) in enumerate(names.items()):
            for q in qualities:
                keep = grid_q if i == 0 else ()
                pts, dec = fedlvc_points(frames, model, [q], info.fps, keep_decoded=keep, gop=g, codec=name)
                ours += pts
                decoded.update(dec)
                bar.update(1)
        for name in BASELINES:
            for crf in crfs:
                pts, k = baseline_points(frames, info.fps, [name], [crf], keep=("x264", crfs[len(crfs) // 2]))
                theirs += pts
                kept.update(k)
                bar.update(1)
    points = ours + theirs
    report = {
        "input": os.path.basename(str(path)),
        "frames": int(frames.shape[0]),
        "width": int(frames.shape[2]),
        "height": int(frames.shape[1]),
        "fps": float(info.fps),
        "model_fingerprint": fingerprint(model).hex(),
        "points": points,
        "bd_rate_vs": bd_rates(points),
        "note": "bpp counts every byte of each file (fedlvc .lvc header included, whole mp4 for x264/x265); "
        "PSNR-RGB and MS-SSIM by the same code on frames decoded from those files",
    }
    return Evaluation(report, frames, decoded, kept, grid_q)


def write_evaluation(ev: Evaluation, json_path=None, plot_path=None, grid_path=None) -> None:
    """The report as JSON, the RD plot, and the original-vs-reconstruction grid, where asked for."""
    report = ev.report
    if json_path:
        with atomic_output(json_path) as tmp:
            Path(tmp).write_text(json.dumps(report, indent=2))
    if plot_path:
        title = f"{report['input']} ({report['width']}x{report['height']}, {report['frames']} frames)"
        plot_rd(report["points"], plot_path, title=title)
    if grid_path:
        rows = [("original", ev.frames)] + [(f"fedlvc q{q}", ev.decoded[q]) for q in ev.grid_qualities]
        rows += [(f"{name} crf {crf}", dec) for (name, crf), dec in ev.kept.items()]
        label = {
            **{f"fedlvc q{p['quality']}": p for p in report["points"] if p["codec"] == "fedlvc"},
            **{f"{p['codec']} crf {p['crf']}": p for p in report["points"] if "crf" in p},
        }
        plot_grid(rows, grid_path, {k: p["bpp"] for k, p in label.items()}, {k: p["psnr"] for k, p in label.items()})


def plot_rd(points: list[dict], out, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name in dict.fromkeys(p["codec"] for p in points):
        pts = sorted((p["bpp"], p["psnr"]) for p in points if p["codec"] == name)
        ax.plot([b for b, _ in pts], [q for _, q in pts], "o-", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("bits per pixel (whole file)")
    ax.set_ylabel("PSNR-RGB (dB)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_output(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def plot_grid(rows, out, bpp_of: dict, psnr_of: dict, frame_index: int | None = None) -> None:
    """Original vs reconstructions of one frame (the middle one), one panel per codec/setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = rows[0][1].shape[0]
    i = t // 2 if frame_index is None else frame_index
    fig, axes = plt.subplots(
        1, len(rows), figsize=(3.2 * len(rows), 3.2 * rows[0][1].shape[1] / rows[0][1].shape[2] + 0.6)
    )
    for ax, (name, frames) in zip(np.atleast_1d(axes), rows):
        ax.imshow(frames[i])
        label = name if name not in bpp_of else f"{name}\n{bpp_of[name]:.3f} bpp, {psnr_of[name]:.2f} dB"
        ax.set_title(label, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    with atomic_output(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def print_report(report: dict) -> None:
    print(f"{report['input']}: {report['frames']} frames {report['width']}x{report['height']}")
    print(f"{'codec':<12}{'setting':>9}{'bytes':>10}{'bpp':>9}{'PSNR':>8}{'MS-SSIM':>9}{'enc fps':>9}")
    for p in report["points"]:
        setting = f"q{p['quality']}" if p["codec"].startswith("fedlvc") else f"crf{p['crf']}"
        print(
            f"{p['codec']:<12}{setting:>9}{p['bytes']:>10}{p['bpp']:>9.4f}{p['psnr']:>8.2f}{p['ms_ssim']:>9.4f}"
            f"{p['encode_fps']:>9.1f}"
        )
    for name, v in report["bd_rate_vs"].items():
        print(f"BD-rate of fedlvc vs {name}: " + ("no overlap in PSNR" if v is None else f"{v:+.1f} %"))
