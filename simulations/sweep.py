"""``fedlvc sweep CONFIG.yaml --out DIR``: privacy vs quality, one federated simulation per noise setting.

Each setting runs the same ServerApp/ClientApp on Flower's simulation runtime (a SuperLink this process
starts and stops). A setting whose ``runs/<name>/summary.json`` exists is not rerun, so a sweep resumes (one
that misses a site's figures is refused with what to do, not taken as finished).
Then every final model is measured at every quality level on the sites' held-out frames (never trained on),
with x264 on the same frames, into ``results.csv``, ``privacy_quality.png``, ``rd_curves.png`` and
``recon_grid.png``. Rows also give the public starting model (no fine-tuning, ε = 0).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from common.checkpoint import load_model
from common.config.fedconfig import RunConfig
from common.data.clips import generated_site_frames, split_held_out
from common.data.sites import simulated_site
from common.data.video import atomic_output
from common.errors import FedlvcError
from common.eval.evaluate import baseline_points, fedlvc_points
from common.eval.metrics import psnr_rgb

SWEEP_KEYS = {
    "noise-multipliers",
    "learning-rates",
    "batch-sizes",
    "num-sites",
    "clip-only-reference",
    "x264-crfs",
    "matched-bpp",
    "run-timeout-minutes",
}
DEFAULT_RUN_TIMEOUT_MINUTES = 360  # one setting's flwr run (the 2,000-frame studies take about an hour each)
CSV_COLUMNS = [
    "setting",
    "codec",
    "noise_multiplier",
    "clip_only",
    "epsilon",
    "delta",
    "accountant",
    "quality",
    "crf",
    "bpp",
    "psnr",
    "ms_ssim",
    "max_grad_norm",
    "sample_rate",
    "steps",
    "rounds",
    "privacy_unit",
    "unit_frames",
    "units_per_site",
    "sites",
]


@dataclass
class Setting:
    name: str
    noise_multiplier: float
    clip_only: bool = False
    learning_rate: float | None = None  # this setting's own (learning-rates), else the run config's
    batch_size: int | None = None  # this setting's own (batch-sizes), else the run config's


def _number_in(value, top: float) -> bool:
    """Whether a YAML value is a number (not a boolean) in (0, top]."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value <= top


def load_sweep(path) -> tuple[dict, list[Setting], RunConfig, dict]:
    """Read and check the YAML: (sweep options, settings, run config, run-config overrides)."""
    p = Path(path)
    if not p.is_file():
        raise FedlvcError(f"sweep config not found: {p}")
    try:
        doc = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise FedlvcError(f"sweep config {p} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(doc, dict):
        raise FedlvcError(f"sweep config {p} must be a mapping of keys to values")
    sweep = {k: doc[k] for k in SWEEP_KEYS if k in doc}
    overrides = {k: v for k, v in doc.items() if k not in SWEEP_KEYS}
    for key in ("out-dir", "noise-multiplier", "clip-only", "min-sites"):
        if key in overrides:
            raise FedlvcError(f"sweep config key {key!r} is set by the sweep itself; remove it")
    if overrides.get("demo-photos"):  # the simulated sites run elsewhere: a path relative to here, made absolute
        overrides["demo-photos"] = str(Path(str(overrides["demo-photos"])).expanduser().resolve())
    rc = RunConfig.from_mapping(overrides)  # names the offending key when one is unknown or mistyped
    sigmas = sweep.get("noise-multipliers")
    if not isinstance(sigmas, list) or not sigmas or not all(isinstance(s, (int, float)) and s >= 0 for s in sigmas):
        raise FedlvcError("sweep config key 'noise-multipliers' must be a non-empty list of numbers >= 0")
    sites = sweep.get("num-sites", 4)
    if not isinstance(sites, int) or sites < 1:
        raise FedlvcError("sweep config key 'num-sites' must be a positive integer")
    sweep["num-sites"] = sites
    minutes = sweep.get("run-timeout-minutes", DEFAULT_RUN_TIMEOUT_MINUTES)
    if not _number_in(minutes, 7 * 24 * 60):
        raise FedlvcError(
            f"sweep config key 'run-timeout-minutes' holds {minutes!r}: it must be a number of minutes in (0, 10080]"
        )
    sweep["run-timeout-minutes"] = float(minutes)
    rates = sweep.get("learning-rates", [None] * len(sigmas))
    if not isinstance(rates, list) or len(rates) != len(sigmas):
        raise FedlvcError("sweep config key 'learning-rates' must be a list with one rate per noise multiplier")
    for lr in rates:
        if lr is not None and not _number_in(lr, 1):
            raise FedlvcError(f"sweep config key 'learning-rates' holds {lr!r}: each must be a number in (0, 1]")
    batches = sweep.get("batch-sizes", [None] * len(sigmas))
    if not isinstance(batches, list) or len(batches) != len(sigmas):
        raise FedlvcError("sweep config key 'batch-sizes' must be a list with one batch size per noise multiplier")
    for b in batches:
        if b is not None and not (isinstance(b, int) and not isinstance(b, bool) and _number_in(b, 4096)):
            raise FedlvcError(f"sweep config key 'batch-sizes' holds {b!r}: each must be a whole number in [1, 4096]")
    settings = [
        Setting(f"sigma_{float(s):g}", float(s), learning_rate=None if lr is None else float(lr), batch_size=b)
        for s, lr, b in zip(sigmas, rates, batches)
    ]
    names = [st.name for st in settings]
    if len(set(names)) != len(names):
        raise FedlvcError("sweep config key 'noise-multipliers' holds a noise multiplier twice: one setting each")
    if sweep.get("clip-only-reference", True):
        settings.append(Setting("clip_only", 0.0, clip_only=True))
    return sweep, settings, rc, overrides


def _run_config_text(overrides: dict, setting: Setting, out_dir: Path, sites: int) -> str:
    def fmt(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return "'" + v.replace("'", "") + "'"
        return repr(v)

    items = dict(overrides)
    items.update(
        {
            "noise-multiplier": setting.noise_multiplier,
            "clip-only": setting.clip_only,
            "out-dir": str(out_dir),
            "min-sites": sites,
            **({"learning-rate": setting.learning_rate} if setting.learning_rate is not None else {}),
            **({"batch-size": setting.batch_size} if setting.batch_size is not None else {}),
        }
    )
    return " ".join(f"{k}={fmt(v)}" for k, v in items.items())


def held_out_frames(rc: RunConfig, sites: int) -> np.ndarray:
    """The held-out frames of every generated site (the frames the ClientApps never train on)."""
    frames = []
    for site in range(sites):
        all_frames = simulated_site(site + rc.demo_site_offset, rc)  # a streamed site, generated on demand
        if all_frames is None:
            all_frames = generated_site_frames(
                site + rc.demo_site_offset, rc.demo_clips, rc.demo_frames, rc.demo_width, rc.demo_height
            )
        frames += list(split_held_out(all_frames, rc.eval_frames)[1])
    return np.stack(frames)


def _site_privacy(history_file: Path) -> dict:
    doc = json.loads(history_file.read_text())
    last = doc["rounds"][-1]
    sites = last["sites"].values()
    return {
        "epsilon": max((s["epsilon"] for s in sites), default=0.0),
        "sample_rate": max((s.get("sample_rate", 0.0) for s in sites), default=0.0),
        "steps": max((sum(n for _, _, n in s.get("dp_history", [])) for s in sites), default=0),
        "units_per_site": min((s.get("units", 0) for s in sites), default=0),
        "rounds": last["round"],
    }


def run_sweep(config_path, out_dir, progress: bool = True) -> Path:
    sweep, settings, rc, overrides = load_sweep(config_path)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(config_path, out / "sweep.yaml")
    sites = sweep["num-sites"]
    for s in settings:  # a kept run whose sites did not all answer the final queries is not taken as finished
        _check_summary(out, s)
    todo = [s for s in settings if not (out / "runs" / s.name / "summary.json").is_file()]
    if todo:
        from .local_runtime import SimulationRuntime

        (out / "runtime").mkdir(exist_ok=True)
        with (
            SimulationRuntime(out / "runtime") as runtime,
            tqdm(
                total=len(settings), initial=len(settings) - len(todo), desc="sweep", unit="run", disable=not progress
            ) as bar,
        ):
            minutes = sweep["run-timeout-minutes"]
            for s in todo:
                run_dir = out / "runs" / s.name
                run_dir.mkdir(parents=True, exist_ok=True)
                try:
                    result = runtime.run(
                        _run_config_text(overrides, s, run_dir, sites),
                        num_supernodes=sites,
                        timeout=60 * minutes,
                        log=run_dir / "flwr-run.log",
                    )
                except subprocess.TimeoutExpired:
                    raise FedlvcError(
                        f"sweep setting {s.name} did not finish within {minutes:g} minutes (run-timeout-minutes); "
                        f"finished settings are kept: raise the limit and run the sweep again to go on"
                    ) from None
                if result["status"] != "finished:completed" or not (run_dir / "summary.json").is_file():
                    raise FedlvcError(
                        f"sweep setting {s.name} failed (status {result['status']}); see {run_dir / 'flwr-run.log'}"
                    )
                _check_summary(out, s)
                bar.update(1)
    write_results(out, sweep, settings, rc, sites, progress)
    return out


def _check_summary(out: Path, setting: Setting) -> None:
    """Refuse a setting whose ``summary.json`` misses a site's compression or gain: every simulated site is
    ours, so one that was dropped (for example no reply to the final queries within round-timeout, while it
    trained its personal model) leaves the study without its figures. The run's training is kept."""
    path = out / "runs" / setting.name / "summary.json"
    if not path.is_file():
        return
    sites = json.loads(path.read_text()).get("sites") or {}
    missing = [
        f"{name}: {v.get('dropped') or 'no gain over the public model'}"
        for name, v in sorted(sites.items())
        if "refused" not in v and (v.get("dropped") or v.get("gain_over_public") is None)
    ]
    if not sites or missing:
        why = "; ".join(missing) if missing else "no site answered the final queries"
        raise FedlvcError(
            f"sweep setting {setting.name} finished without every site's figures ({why}); raise round-timeout "
            f"and remove {path.parent} to run it again, or measure its final model with "
            f"python -m simulations.measure_setting {path.parent}"
        )


def _measured_models(out: Path, settings: list[Setting], rc: RunConfig) -> list[tuple]:
    """(name, setting or None, final model, its privacy record) of the public model and every setting's run."""
    public = load_model(rc.init_model or None)
    models = [
        ("public", None, public, {"epsilon": 0.0, "sample_rate": 0.0, "steps": 0, "rounds": 0, "units_per_site": ""})
    ]
    for s in settings:
        run_dir = out / "runs" / s.name
        models.append((s.name, s, load_model(run_dir / "final.safetensors"), _site_privacy(run_dir / "history.json")))
    return models


def _fedlvc_row(base: dict, privacy: dict, name: str, s: Setting | None, p: dict) -> dict:
    return {
        **base,
        **privacy,
        "setting": name,
        "codec": "fedlvc",
        "noise_multiplier": "" if s is None else s.noise_multiplier,
        "clip_only": "" if s is None else s.clip_only,
        "quality": p["quality"],
        "crf": "",
        "bpp": p["bpp"],
        "psnr": p["psnr"],
        "ms_ssim": p["ms_ssim"],
    }


def _write_csv(path: Path, rows: list[dict]) -> None:
    with atomic_output(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for r in rows:
                r = dict(r)
                if isinstance(r.get("epsilon"), float) and math.isinf(r["epsilon"]):
                    r["epsilon"] = "inf"
                writer.writerow(r)


def write_results(out: Path, sweep: dict, settings: list[Setting], rc: RunConfig, sites: int, progress: bool) -> None:
    frames = held_out_frames(rc, sites)
    crfs = tuple(sweep.get("x264-crfs", (18, 23, 28, 33, 38)))
    rows, curves, grid = [], {}, []
    base = {
        "delta": rc.delta,
        "accountant": rc.accountant,
        "max_grad_norm": rc.max_grad_norm,
        "privacy_unit": rc.privacy_unit,
        "unit_frames": rc.unit_frames,
        "sites": sites,
    }
    models = _measured_models(out, settings, rc)
    qualities = list(range(1, models[0][2].cfg.num_levels + 1))
    for name, s, model, privacy in tqdm(models, desc="measure", unit="model", disable=not progress):
        points, decoded = fedlvc_points(frames, model, qualities, 25, keep_decoded=(rc.final_quality,))
        curves[name] = points
        grid.append((name, privacy["epsilon"], decoded[rc.final_quality]))
        rows += [_fedlvc_row(base, privacy, name, s, p) for p in points]
    x264, _ = baseline_points(frames, 25, ["x264"], crfs)
    curves["x264"] = x264
    keys = ("crf", "bpp", "psnr", "ms_ssim")
    rows += [{"setting": "x264", "codec": "x264", **{k: p[k] for k in keys}, "sites": sites} for p in x264]
    _write_csv(out / "results.csv", rows)
    write_site_gains(out, settings)
    matched = float(sweep.get("matched-bpp") or np.median([p["bpp"] for p in curves["public"]]))
    write_study(out / "study.json", models, curves, matched, rc, settings)
    plot_privacy_quality(out / "privacy_quality.png", models, curves, matched)
    plot_rd_curves(out / "rd_curves.png", curves)
    plot_recon_grid(out / "recon_grid.png", frames, grid, rc.final_quality)


SITE_GAIN_COLUMNS = [
    "setting",
    "site",
    "epsilon",
    "bd_rate_vs_public_percent",
    "psnr_gain_db_at_final_quality",
    "bpp_ratio_at_final_quality",
    "bd_rate_personal_vs_public_percent",
]


def run_sites(out: Path, setting: Setting) -> dict:
    """``summary.json → sites`` of one setting's run: per site its ε, compression and gains over the public model."""
    return json.loads((out / "runs" / setting.name / "summary.json").read_text())["sites"]


def write_site_gains(out: Path, settings: list[Setting]) -> None:
    """``site_gains.csv``: per setting and site, what the federated model gains over the public one on the
    site's own held-out frames (from each run's summary.json, measured by the sites: query.rd)."""
    with atomic_output(out / "site_gains.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=SITE_GAIN_COLUMNS)
            writer.writeheader()
            for st in settings:
                for site, v in run_sites(out, st).items():
                    gain = v.get("gain_over_public") or {}
                    personal = v.get("gain_over_public_personal") or {}
                    eps = v.get("epsilon")
                    writer.writerow(
                        {
                            "setting": st.name,
                            "site": site,
                            "epsilon": "inf" if isinstance(eps, float) and math.isinf(eps) else eps,
                            "bd_rate_vs_public_percent": gain.get("bd_rate_percent"),
                            "psnr_gain_db_at_final_quality": gain.get("psnr_db"),
                            "bpp_ratio_at_final_quality": gain.get("bpp_ratio"),
                            "bd_rate_personal_vs_public_percent": personal.get("bd_rate_percent"),
                        }
                    )


def write_study(path: Path, models, curves: dict, bpp: float, rc: RunConfig, settings: list[Setting]) -> dict:
    """``study.json``: per setting its ε, its PSNR at ``bpp`` on the sites' pooled held-out frames and the
    difference to the non-private federated model (σ = 0, not clip-only) at that rate, and per site the
    BD-rate against the public model of the shared model and of the site's personal model (``site_gains``)."""
    reference = next((s.name for s in settings if s.noise_multiplier == 0 and not s.clip_only), None)
    ref_psnr = psnr_at_bpp(curves[reference], bpp) if reference else None
    study = {"matched_bpp": bpp, "non_private_reference": reference, "settings": {}}
    for name, s, _, privacy in models:
        psnr = psnr_at_bpp(curves[name], bpp)
        entry = {
            "noise_multiplier": None if s is None else s.noise_multiplier,
            "clip_only": None if s is None else s.clip_only,
            "learning_rate": None if s is None else (s.learning_rate or rc.learning_rate),
            "batch_size": None if s is None else (s.batch_size or rc.batch_size),
            "epsilon": "inf" if math.isinf(privacy["epsilon"]) else privacy["epsilon"],
            "psnr_at_matched_bpp": psnr,
            "db_vs_non_private": None if psnr is None or ref_psnr is None else psnr - ref_psnr,
        }
        if s is not None:
            sites = run_sites(path.parent, s)
            for key, field in (
                ("gain_over_public", "site_bd_rate_vs_public"),
                ("gain_over_public_personal", "site_bd_rate_personal_vs_public"),
            ):
                entry[field] = {k: (v.get(key) or {}).get("bd_rate_percent") for k, v in sites.items()}
        study["settings"][name] = entry
    with atomic_output(path) as tmp:
        Path(tmp).write_text(json.dumps(study, indent=1))
    return study


def psnr_at_bpp(points: list[dict], bpp: float) -> float | None:
    """PSNR of an RD curve at ``bpp`` by linear interpolation in log-rate (None outside the curve)."""
    pts = sorted((math.log(p["bpp"]), p["psnr"]) for p in points)
    xs, ys = [x for x, _ in pts], [y for _, y in pts]
    lb = math.log(bpp)
    if not xs[0] <= lb <= xs[-1]:
        return None
    return float(np.interp(lb, xs, ys))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_privacy_quality(path: Path, models, curves, bpp: float) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    finite = []
    for name, s, _, privacy in models:
        q = psnr_at_bpp(curves[name], bpp)
        if q is None:
            continue
        eps = privacy["epsilon"]
        if name == "public":
            ax.axhline(q, color="gray", ls=":", label=f"public model (no fine-tuning) {q:.2f} dB")
        elif math.isinf(eps):
            ax.axhline(
                q,
                ls="--",
                color="k" if not s.clip_only else "tab:orange",
                label=("clip only" if s.clip_only else "non-private") + f" {q:.2f} dB",
            )
        else:
            finite.append((eps, q, name))
    if finite:
        finite.sort()
        ax.plot([e for e, _, _ in finite], [q for _, q, _ in finite], "o-", label="DP-SGD (frame-level ε)")
        for e, q, name in finite:
            ax.annotate(name, (e, q), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.set_xscale("log")
    ax.set_xlabel("ε (δ as in results.csv), max over sites")
    ax.set_ylabel(f"PSNR-RGB at {bpp:.3f} bpp (dB)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def plot_rd_curves(path: Path, curves: dict) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, points in curves.items():
        pts = sorted((p["bpp"], p["psnr"]) for p in points)
        ax.plot([b for b, _ in pts], [q for _, q in pts], "s--" if name == "x264" else "o-", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("bits per pixel (whole file)")
    ax.set_ylabel("PSNR-RGB (dB)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def plot_recon_grid(path: Path, frames: np.ndarray, grid, quality: int) -> None:
    plt = _plt()
    i = len(frames) // 2
    panels = [("original", None, frames)] + grid
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.6 * frames.shape[1] / frames.shape[2] + 0.7))
    for ax, (name, eps, f) in zip(np.atleast_1d(axes), panels):
        ax.imshow(f[i])
        label = (
            name
            if eps is None
            else f"{name}\nε={'∞' if math.isinf(eps) else f'{eps:.2f}'}, {psnr_rgb(frames[i], f[i]):.2f} dB"
        )
        ax.set_title(label, fontsize=7)
        ax.axis("off")
    fig.suptitle(f"held-out frame, quality {quality}", fontsize=8)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
