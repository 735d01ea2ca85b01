"""``fedlvc sweep``: config checking, and a tiny real sweep that resumes without rerunning finished settings."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from client.cli import main as cli
from common.config.fedconfig import RunConfig
from common.errors import FedlvcError
from simulations.sweep import CSV_COLUMNS, load_sweep, psnr_at_bpp

REPO = Path(__file__).resolve().parent.parent


def _yaml(tmp_path, text: str) -> Path:
    p = tmp_path / "sweep.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "text, key",
    [
        ("noise-multipliers: [1.0]\nlocal-stepz: 3\n", "local-stepz"),
        ("noise-multipliers: [1.0]\nbatch-size: many\n", "batch-size"),
        ("noise-multipliers: 1.0\n", "noise-multipliers"),
        ("noise-multipliers: [-1]\n", "noise-multipliers"),
        ("noise-multipliers: [1.0]\nnum-sites: 0\n", "num-sites"),
        ("noise-multipliers: [1.0]\nout-dir: x\n", "out-dir"),
        ("noise-multipliers: [1.0\n", "YAML"),
        ("noise-multipliers: [1.0]\nlearning-rates: [0.1, 0.2]\n", "learning-rates"),
        ("noise-multipliers: [1.0]\nlearning-rates: [0]\n", "learning-rates"),
        ("noise-multipliers: [1.0]\nrun-timeout-minutes: 0\n", "run-timeout-minutes"),
        ("noise-multipliers: [1.0]\nbatch-sizes: [16, 32]\n", "batch-sizes"),
        ("noise-multipliers: [1.0]\nbatch-sizes: [0]\n", "batch-sizes"),
        ("noise-multipliers: [1.0]\nbatch-sizes: [8.5]\n", "batch-sizes"),
        ("noise-multipliers: [1.0]\nbatch-sizes: [true]\n", "batch-sizes"),
        ("noise-multipliers: [1.0, 1]\n", "noise-multipliers"),
        ("noise-multipliers: [1.0]\nrun-timeout-minutes: soon\n", "run-timeout-minutes"),
    ],
)
def test_config_errors_name_the_offending_key(tmp_path, capsys, text, key):
    path = _yaml(tmp_path, text)
    with pytest.raises(FedlvcError, match=key):
        load_sweep(path)
    assert cli(["sweep", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedlvc: error:") and key in err[0]


def test_default_study_config_is_valid():
    sweep, settings, rc, _ = load_sweep(REPO / "simulations" / "privacy_quality.yaml")
    assert [s.noise_multiplier for s in settings if not s.clip_only] == sweep["noise-multipliers"]
    assert any(s.clip_only for s in settings) and sweep["num-sites"] == 4


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "simulations").glob("*.yaml")))
def test_every_study_config_is_valid(name):
    sweep, settings, rc, _ = load_sweep(REPO / "simulations" / name)
    assert [s.noise_multiplier for s in settings if not s.clip_only] == sweep["noise-multipliers"]
    if name in ("large_sites.yaml", "photo_sites.yaml"):  # sites of realistic size, streamed, in bounded memory
        assert rc.site_frames >= 2000 and rc.max_physical_batch and rc.batch_size >= 64
    if name == "photo_sites.yaml":  # the sites run in another folder: the corpus path is made absolute
        assert Path(rc.demo_photos).is_absolute() and rc.demo_photos.endswith("data/public/photos")


def test_a_setting_past_its_time_limit_is_one_clear_error_and_finished_settings_stay(tmp_path, monkeypatch, capsys):
    import subprocess

    import simulations.local_runtime as lr

    asked = []

    class SlowRuntime:  # stands in for the SuperLink: every run outlasts its limit
        def __init__(self, workdir):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def run(self, run_config, num_supernodes, cpus_per_site=1, timeout=3600, log=None):
            asked.append(timeout)
            raise subprocess.TimeoutExpired(["flwr", "run"], timeout)

    monkeypatch.setattr(lr, "SimulationRuntime", SlowRuntime)
    path = _yaml(tmp_path, "noise-multipliers: [0.0, 1.0]\nclip-only-reference: false\nrun-timeout-minutes: 1.5\n")
    out = tmp_path / "o"
    done = out / "runs" / "sigma_0"
    done.mkdir(parents=True)
    finished = json.dumps({"rounds": 1, "sites": {"site_0": {"gain_over_public": {"bd_rate_percent": -1.0}}}})
    (done / "summary.json").write_text(finished)  # sigma_0 finished in an earlier sweep: not run again
    assert cli(["sweep", str(path), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sigma_1 did not finish within 1.5 minutes (run-timeout-minutes)" in err[0]
    assert asked == [90.0] and (done / "summary.json").read_text() == finished


@pytest.mark.parametrize(
    "sites, why",
    [
        ({}, "no site answered the final queries"),
        (
            {
                "site_0": {"gain_over_public": {"bd_rate_percent": -1.0}},
                "site_1": {"dropped": "no reply to query.compress within round-timeout (3600 s)"},
            },
            "site_1: no reply to query.compress within round-timeout (3600 s)",
        ),
        ({"site_0": {"bytes": 10, "gain_over_public": None}}, "site_0: no gain over the public model"),
    ],
)
def test_a_kept_run_without_every_sites_figures_is_one_clear_error_not_a_finished_setting(
    tmp_path, monkeypatch, capsys, sites, why
):
    import simulations.local_runtime as lr

    monkeypatch.setattr(lr, "SimulationRuntime", None)  # nothing may be run again: the runtime is never started
    path = _yaml(tmp_path, "noise-multipliers: [1.0]\nclip-only-reference: false\n")
    out = tmp_path / "o"
    kept = out / "runs" / "sigma_1"
    kept.mkdir(parents=True)
    summary = json.dumps({"rounds": 5, "sites": sites})
    (kept / "summary.json").write_text(summary)
    assert cli(["sweep", str(path), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"sigma_1 finished without every site's figures ({why})" in err[0]
    assert "round-timeout" in err[0] and "simulations.measure_setting" in err[0]
    assert (kept / "summary.json").read_text() == summary and not (out / "results.csv").exists()


def test_psnr_at_matched_bpp_interpolates_in_log_rate():
    pts = [{"bpp": 0.1, "psnr": 30.0}, {"bpp": 0.4, "psnr": 34.0}]
    assert psnr_at_bpp(pts, 0.2) == pytest.approx(32.0)
    assert psnr_at_bpp(pts, 0.05) is None


@pytest.mark.slow
def test_tiny_sweep_writes_results_and_resumes(tmp_path):
    config = _yaml(
        tmp_path,
        """
noise-multipliers: [0.0, 2.0]
learning-rates: [0.001, 0.0005]
batch-sizes: [8, 4]
num-sites: 2
clip-only-reference: false
x264-crfs: [23, 33]
num-server-rounds: 1
local-steps: 2
batch-size: 8
crop-size: 32
demo-frames: 12
demo-clips: 1
demo-width: 64
demo-height: 48
eval-frames: 2
personal-steps: 2
""",
    )
    out = tmp_path / "out"
    assert cli(["sweep", str(config), "--out", str(out), "--quiet"]) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert set(CSV_COLUMNS) <= set(rows[0])
    by_setting = {}
    for r in rows:
        by_setting.setdefault(r["setting"], []).append(r)
    assert set(by_setting) == {"public", "sigma_0", "sigma_2", "x264"}
    assert len(by_setting["sigma_2"]) == 6  # one row per quality level
    assert by_setting["sigma_0"][0]["epsilon"] == "inf"
    eps = float(by_setting["sigma_2"][0]["epsilon"])
    assert 0 < eps < math.inf and int(by_setting["sigma_2"][0]["steps"]) == 2
    for name in ("privacy_quality.png", "rd_curves.png", "recon_grid.png"):
        assert (out / name).stat().st_size > 1000
    gains = list(csv.DictReader(open(out / "site_gains.csv")))  # per site: federated vs public on its own frames
    assert {(g["setting"], g["site"]) for g in gains} == {
        (st, site) for st in ("sigma_0", "sigma_2") for site in ("site_0", "site_1")
    }
    assert all(math.isfinite(float(g["psnr_gain_db_at_final_quality"])) for g in gains)
    assert {g["epsilon"] for g in gains if g["setting"] == "sigma_0"} == {"inf"}
    # The learning rate and batch size of each setting reached its run; study.json compares each with the
    # non-private one.
    for name, lr, batch in (("sigma_0", 0.001, 8), ("sigma_2", 0.0005, 4)):
        history = json.loads((out / "runs" / name / "history.json").read_text())
        assert history["run_config"]["learning-rate"] == lr and history["run_config"]["batch-size"] == batch
    study = json.loads((out / "study.json").read_text())
    assert study["non_private_reference"] == "sigma_0" and set(study["settings"]) == {"public", "sigma_0", "sigma_2"}
    assert study["settings"]["sigma_2"]["learning_rate"] == 0.0005 and study["settings"]["sigma_2"]["batch_size"] == 4
    assert set(study["settings"]["sigma_2"]["site_bd_rate_personal_vs_public"]) == {"site_0", "site_1"}
    if study["settings"]["sigma_0"]["psnr_at_matched_bpp"] is not None:
        assert study["settings"]["sigma_0"]["db_vs_non_private"] == 0.0
    _measure_setting_agrees(out, study["settings"]["sigma_2"])
    finished = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")}
    assert cli(["sweep", str(config), "--out", str(out), "--quiet"]) == 0  # resumes: nothing is rerun
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")} == finished


def _measure_setting_agrees(out: Path, entry: dict) -> None:
    """``simulations/measure_setting.py`` (for a setting stopped before its summary.json) reports what the sweep
    and its sites did for a finished one; a personal model it trains in a site's place is the site's."""
    from client.personal import personal_file
    from common.checkpoint import fingerprint, load_model
    from simulations import measure_setting

    sites_dir = out / "runtime" / "runs" / "sites"
    final_model = load_model(out / "runs" / "sigma_2" / "final.safetensors")
    rc = RunConfig.from_mapping(json.loads((out / "runs" / "sigma_2" / "history.json").read_text())["run_config"])
    stored = sites_dir / "site_1" / "personal" / personal_file(fingerprint(final_model).hex(), rc)
    site_made, final = load_model(stored).state_dict(), final_model.state_dict()
    for p in stored.parent.glob(stored.stem + ".*"):
        p.unlink()
    run = [str(out / "runs" / "sigma_2"), "--sites", "2", "--sites-dir", str(sites_dir)]
    measured = measure_setting.main([*run, "--train-personal", "1"])
    remade = load_model(stored).state_dict()  # the same name: the same final model, steps, parts and rate
    assert max((site_made[k] - final[k]).abs().max().item() for k in final) > 1e-4  # fine-tuning moved it
    assert max((site_made[k] - remade[k]).abs().max().item() for k in final) < 1e-5  # the site's rows and seed
    assert set(remade) == set(site_made)
    for site in ("site_0", "site_1"):
        assert measured["sites"][site]["federated"] == entry["site_bd_rate_vs_public"][site]
        assert measured["sites"][site]["personal"] == pytest.approx(entry["site_bd_rate_personal_vs_public"][site])
    pooled, reference = measured["psnr_at_matched_bpp"]["final"], entry["psnr_at_matched_bpp"]
    assert (pooled is None) == (reference is None) and pooled == pytest.approx(reference, abs=1e-9)
    with pytest.raises(FedlvcError, match="needs --sites-dir <runtime>/runs/sites"):
        measure_setting.main([run[0], "--train-personal", "1", "--train-only"])


def test_the_sweep_measures_a_streamed_site_on_the_frames_it_holds_out():
    from client.policy import SitePolicy
    from client.site import load_site
    from simulations.sweep import held_out_frames

    rc = RunConfig.from_mapping({"site-frames": 300, "demo-frames": 40, "demo-width": 64, "demo-height": 48})
    frames = held_out_frames(rc, 2)
    assert frames.shape == (2 * rc.eval_frames, 48, 64, 3)
    for k in range(2):  # what the sweep measures is what each ClientApp holds out
        node = {"partition-id": k, "num-partitions": 2}
        site = load_site(node, rc, SitePolicy.of(node), k)
        assert np.array_equal(np.stack(site.held_out), frames[k * rc.eval_frames : (k + 1) * rc.eval_frames])


def test_fedlvc_offers_sweep_without_the_client_importing_simulations():
    """``fedlvc sweep`` comes from simulations' ``fedlvc.commands`` entry point: building the command line loads that
    light parser builder only, never the sweep (nor torch), and the client has no import of simulations."""
    code = (
        "import sys; from client.cli import build_parser; "
        "args = build_parser().parse_args(['sweep', 'c.yaml', '--out', 'o', '--quiet']); "
        "print(args.func.__module__, sorted(m for m in ('simulations.sweep', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.split() == ["simulations.commands", "[]"]
