"""Federated DP training: the ClientApp's privacy accounting, its replies, and Flower runs end to end."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client import app as client_app
from common.config.fedconfig import RunConfig
from common.errors import FedlvcError
from common.net.architecture import CodecConfig
from common.net.model import FedlvcCodec
from common.train.privacy import RDP_ALPHAS
from tests.fault_mod import Fault, app_with_faults

REPO = Path(__file__).resolve().parent.parent
TINY = CodecConfig(channels=8, latent_channels=8, mixtures=2)
RUN = {
    "local-steps": 3,
    "batch-size": 4,
    "crop-size": 32,
    "demo-frames": 12,
    "demo-clips": 1,
    "demo-width": 64,
    "demo-height": 48,
    "eval-frames": 2,
    "noise-multiplier": 1.0,
    "epsilon-budget": 50.0,
}


pytestmark = pytest.mark.usefixtures("flower_task_identity")  # tests/conftest.py


def _model(seed=0) -> FedlvcCodec:
    torch.manual_seed(seed)
    return FedlvcCodec(TINY)


def _message(model: FedlvcCodec, kind: str, server_round: int = 1) -> Message:
    config = ConfigRecord({"model-config": json.dumps(model.cfg.to_dict()), "server-round": server_round})
    return Message(
        RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": config}), dst_node_id=1, message_type=kind
    )


def _rd_message(federated: FedlvcCodec, public: FedlvcCodec, server_round: int = 1) -> Message:
    """The server's one query.rd of a round: both models, the round's number."""
    config = ConfigRecord({"model-config": json.dumps(federated.cfg.to_dict()), "server-round": server_round})
    return Message(
        RecordDict(
            {
                "federated": ArrayRecord(federated.state_dict()),
                "public": ArrayRecord(public.state_dict()),
                "config": config,
            }
        ),
        dst_node_id=1,
        message_type="query.rd",
    )


def _context(run=None, node=None) -> Context:
    node_config = {"partition-id": 0, "num-partitions": 2, **(node or {})}
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={**RUN, **(run or {})})


def independent_epsilon(sigmas, rates, steps, delta) -> float:
    """ε from the recorded history with Opacus' RDP analysis functions, not through our code."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    rdp = sum(compute_rdp(q=q, noise_multiplier=s, steps=n, orders=RDP_ALPHAS) for s, q, n in zip(sigmas, rates, steps))
    eps, _ = get_privacy_spent(orders=RDP_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


def test_epsilon_grows_each_round_and_matches_an_independent_accountant():
    ctx, model, eps = _context(), _model(), []
    for rnd in (1, 2, 3):
        reply = client_app.train(_message(model, "train", rnd), ctx)
        m = reply.content["metrics"]
        assert m["declined"] == 0 and m["steps"] == RUN["local-steps"]
        recomputed = independent_epsilon(m["dp_sigma"], m["dp_sample_rate"], m["dp_steps"], m["delta"])
        assert m["epsilon"] == pytest.approx(recomputed, rel=1e-9)
        assert sum(m["dp_steps"]) == rnd * RUN["local-steps"]
        eps.append(m["epsilon"])
        model.load_state_dict(reply.content["arrays"].to_torch_state_dict())
    assert eps[0] < eps[1] < eps[2]


def test_a_site_declines_before_its_budget_would_be_passed():
    ctx, model = _context(), _model()
    first = client_app.train(_message(model, "train", 1), ctx).content["metrics"]
    budget = first["epsilon"] * 1.05  # a second round would pass it
    ctx.run_config["epsilon-budget"] = budget
    msg = _message(model, "train", 2)
    reply = client_app.train(msg, ctx)
    m = reply.content["metrics"]
    assert m["declined"] == 1 and m["num-examples"] == 0 and m["steps"] == 0
    assert m["epsilon"] == pytest.approx(first["epsilon"]) and m["epsilon"] <= budget
    sent = msg.content["arrays"].to_torch_state_dict()
    back = reply.content["arrays"].to_torch_state_dict()
    assert all(torch.equal(sent[k], back[k]) for k in sent)  # nothing trained, nothing spent


def test_reply_carries_only_model_arrays_and_scalar_metrics():
    ctx, model = _context(), _model()
    reply = client_app.train(_message(model, "train"), ctx)
    assert set(reply.content.keys()) == {"arrays", "metrics", "site"}
    site = reply.content["site"]  # the site's name, and why it declined (empty: it trained)
    assert set(site.keys()) == {"name", "note", "accountant"} and site["name"] == "site_0" and site["note"] == ""
    arrays = reply.content["arrays"].to_torch_state_dict()
    expected = model.state_dict()
    assert set(arrays) == set(expected)
    assert all(arrays[k].shape == expected[k].shape for k in arrays)
    metrics = reply.content["metrics"]
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        assert all(isinstance(v, (int, float)) for v in values), key
        assert len(values) <= 8, f"{key} carries {len(values)} values"  # history entries, not pixels
    ev = client_app.evaluate(_message(model, "evaluate"), ctx)
    assert set(ev.content.keys()) == {"metrics", "site"}
    assert ev.content["metrics"]["bpp"] > 0 and math.isfinite(ev.content["metrics"]["psnr"])


def test_non_private_round_reports_infinite_epsilon():
    ctx, model = _context({"noise-multiplier": 0.0}), _model()
    m = client_app.train(_message(model, "train"), ctx).content["metrics"]
    assert m["declined"] == 0 and math.isinf(m["epsilon"]) and m["dp_sigma"] == [0.0]


def test_a_ledger_refuses_to_mix_privacy_units(tmp_path):
    """A site's ledger kept for frames is not continued by segment rounds (different guarantees)."""
    node = {"state-dir": str(tmp_path / "state")}
    client_app.train(_message(_model(), "train"), _context(node=node))
    doc = json.loads((tmp_path / "state" / "privacy_ledger.json").read_text())
    assert doc["unit_frames"] == 1 and doc["history"]
    segment = {"privacy-unit": "segment", "segment-frames": 3, "demo-frames": 24, "eval-frames": 3}
    with pytest.raises(FedlvcError, match="privacy units"):
        client_app.train(_message(_model(), "train"), _context(segment, node=node))


def _resumed_round(earlier_ledgers: str) -> Message:
    """A round-1 training message of a run continued from resume-from, carrying the server's record."""
    msg = _message(_model(), "train", 1)
    msg.content["config"]["earlier-ledgers"] = earlier_ledgers
    return msg


def test_a_resumed_run_continues_each_sites_epsilon_from_the_earlier_rounds():
    """A site without a ledger on disk (every simulated site) takes the rounds before resume-from from the
    server's history, so ε keeps adding up instead of starting again from zero."""
    from server.recorder import earlier_ledgers

    before = [[1.0, 0.25, 3], [1.0, 0.25, 3]]
    rounds = [
        {"round": 1, "sites": {"site_0": {"dp_history": before[:1], "unit_frames": 1}}},
        {
            "round": 2,
            "sites": {
                "site_0": {"dp_history": before, "unit_frames": 1},
                "site_1": {"dp_history": [], "unit_frames": 1},
            },
        },
    ]
    ledgers = earlier_ledgers(rounds, RunConfig.from_mapping({}))
    assert ledgers == {"site_0": {"unit_frames": 1, "history": before}}  # the latest record of each site
    m = client_app.train(_resumed_round(json.dumps(ledgers)), _context()).content["metrics"]  # partition-id 0: site_0
    assert m["dp_sigma"][:2] == [1.0, 1.0] and m["dp_steps"] == [3, 3, RUN["local-steps"]]
    assert m["epsilon"] == pytest.approx(
        independent_epsilon(m["dp_sigma"], m["dp_sample_rate"], m["dp_steps"], m["delta"]), rel=1e-9
    )
    fresh = client_app.train(_message(_model(), "train", 1), _context()).content["metrics"]
    assert m["epsilon"] > fresh["epsilon"]
    # Another site's record is not this site's; a record of another privacy unit is refused on both sides.
    other = _resumed_round(json.dumps({"site_1": ledgers["site_0"]}))
    assert client_app.train(other, _context()).content["metrics"]["dp_steps"] == [RUN["local-steps"]]
    segment_rounds = [{"round": 1, "sites": {"site_0": {"dp_history": before, "unit_frames": 4}}}]
    with pytest.raises(FedlvcError, match="privacy units of 4 frame"):
        earlier_ledgers(segment_rounds, RunConfig.from_mapping({}))
    mixed = _resumed_round(json.dumps({"site_0": {"unit_frames": 4, "history": before}}))
    with pytest.raises(FedlvcError, match="privacy units of 4 frame"):
        client_app.train(mixed, _context())
    for bad in ("not json", json.dumps({"site_0": {"history": [[1.0, 0.25]]}}), json.dumps(["site_0"])):
        with pytest.raises(FedlvcError, match="earlier-ledgers record is malformed"):
            client_app.train(_resumed_round(bad), _context())


def test_train_parts_entropy_changes_only_gains_and_priors():
    """train-parts = entropy: a DP round moves the quantization gains and the I-frame prior, nothing else."""
    model = _model(7)
    reply = client_app.train(_message(model, "train"), _context({"train-parts": "entropy"}))
    before, after = model.state_dict(), reply.content["arrays"].to_torch_state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"gain.log_gain.weight", "inv_gain.log_gain.weight", "prior.table.weight"}


def test_rd_query_measures_every_quality_on_held_out_frames():
    """query.rd: bpp and PSNR per quality of the model sent, on the site's held-out frames; nothing else."""
    ctx, model = _context(), _model(3)
    client_app.train(_message(model, "train"), ctx)  # a site answers queries for its latest training round
    reply = client_app.rd(_rd_message(model, _model(4)), ctx)
    m = reply.content["metrics"]
    assert set(reply.content.keys()) == {"metrics", "site"}
    assert set(m.keys()) == {"frames", "bpp-federated", "psnr-federated", "bpp-public", "psnr-public"}
    assert m["frames"] == RUN["eval-frames"]
    for name in ("federated", "public"):
        bpp, psnr = m[f"bpp-{name}"], m[f"psnr-{name}"]
        assert len(bpp) == len(psnr) == model.cfg.num_levels
        assert all(b > 0 and math.isfinite(p) for b, p in zip(bpp, psnr))
    assert m["psnr-federated"] != m["psnr-public"]  # two different models, two curves


RESTART_SCRIPT = """
import json, sys, torch
from flwr.supercore.task_identity import TaskIdentity
from client import app as client_app
from tests.test_federation import _context, _message, _model
TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
ctx = _context(node={"state-dir": sys.argv[1]})
m = client_app.train(_message(_model(), "train"), ctx).content["metrics"]
print(json.dumps({"epsilon": m["epsilon"], "steps": m["dp_steps"]}))
"""


def test_a_restarted_site_continues_its_epsilon_from_state_dir(tmp_path):
    def run_site_process():
        out = subprocess.run(
            [sys.executable, "-c", RESTART_SCRIPT, str(tmp_path / "state")],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    first, second = run_site_process(), run_site_process()  # two processes, fresh Context.state each
    assert sum(second["steps"]) == 2 * sum(first["steps"])
    assert second["epsilon"] > first["epsilon"]
    ledger = json.loads((tmp_path / "state" / "privacy_ledger.json").read_text())
    assert sum(n for _, _, n in ledger["history"]) == 2 * RUN["local-steps"]


def test_run_config_errors_name_the_key():
    with pytest.raises(FedlvcError, match="bogus-key"):
        RunConfig.from_mapping({"bogus-key": 1})
    with pytest.raises(FedlvcError, match="local-steps"):
        RunConfig.from_mapping({"local-steps": "many"})
    with pytest.raises(FedlvcError, match="crop-size"):
        RunConfig.from_mapping({"crop-size": 30})


def test_pyproject_run_config_matches_the_typed_defaults():
    import tomllib

    from common.config.fedconfig import RUN_OPTIONS

    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    rc = RunConfig.from_mapping(cfg)  # every key known, every value well typed
    defaults = RunConfig()
    for key in cfg:
        assert getattr(rc, key.replace("-", "_")) == getattr(defaults, key.replace("-", "_")), key
    assert set(cfg) == {opt.name for opt in RUN_OPTIONS}  # and every option of the schema is declared there


# ---------------------------------------------------------------- end to end (real Flower processes)

TINY_RUN = (
    "num-server-rounds=2 local-steps=3 batch-size=8 crop-size=32 demo-frames=16 demo-clips=1 "
    "demo-width=64 demo-height=48 eval-frames=2 noise-multiplier=1.0 epsilon-budget=50.0"
)


def _simulate(tmp_path, config: str, out: Path, sites: int = 2, app: Path = REPO) -> list[dict]:
    """One ``flwr run`` of the app (in ``app``) on our own simulation SuperLink; asserts it completed and
    returns the rounds of ``out/history.json``."""
    from simulations.local_runtime import SimulationRuntime

    with SimulationRuntime(tmp_path) as runtime:
        run = runtime.run(f"{config} out-dir='{out}'", num_supernodes=sites, timeout=900, app=app)
    assert run["status"] == "finished:completed", run["output"][-3000:]
    return json.loads((out / "history.json").read_text())["rounds"]


@pytest.mark.slow
def test_simulation_runs_end_to_end(tmp_path):
    """``flwr run`` on the simulation runtime with a SuperLink we start (and stop by PID) ourselves."""
    from simulations.local_runtime import SimulationRuntime

    out = tmp_path / "out"
    with SimulationRuntime(tmp_path) as runtime:
        run = runtime.run(f"{TINY_RUN} personal-steps=3 out-dir='{out}'", num_supernodes=2, timeout=900)
        port, pid = runtime.port, runtime.process.pid
    assert run["status"] == "finished:completed", run["output"][-3000:]
    history = json.loads((out / "history.json").read_text())
    assert [r["round"] for r in history["rounds"]] == [1, 2]
    for site in ("site_0", "site_1"):
        eps = [r["sites"][site]["epsilon"] for r in history["rounds"]]
        assert eps[0] < eps[1] <= 50.0
        # A simulated site writes under its own working folder (the runtime's), never under the run's out-dir.
        assert list((tmp_path / "runs" / "sites" / site).glob("*.lvc"))
        assert not (out / "sites").exists()
    assert (out / "round_002.safetensors").is_file() and (out / "final.safetensors").is_file()
    assert "PSNR" in run["output"] and "BD-rate vs public" in run["output"]
    summary = json.loads((out / "summary.json").read_text())
    for site in ("site_0", "site_1"):  # the federated model against the public one on the site's own frames
        gain = summary["sites"][site]["gain_over_public"]
        assert len(gain["public"]) == len(gain["federated"]) == 6
        assert gain["bd_rate_percent"] is None or math.isfinite(gain["bd_rate_percent"])
        assert gain["federated"][3][1] - gain["public"][3][1] == pytest.approx(gain["psnr_db"])
        personal = summary["sites"][site]["gain_over_public_personal"]  # the site's own model, kept at the site
        assert len(personal["personal"]) == 6 and personal["public"] == gain["public"]
        assert summary["sites"][site]["personal"] == 1
        assert list((tmp_path / "runs" / "sites" / site / "personal").glob("personal-*.safetensors"))
    assert "+ personal" in run["output"]
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert socket.socket().connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.slow
def test_deployment_superlink_and_two_supernodes_over_tls(tmp_path):
    """SuperLink + 2 authenticated SuperNodes on 127.0.0.1 over TLS (real sockets), status from ``flwr list``;
    then a non-private run submitted over TLS, which each site's policy refuses (its ledger unchanged); and a
    third SuperNode started with --trusted-entities, which runs none of these unsigned app bundles."""
    from common.checkpoint import load_model
    from simulations.local_runtime import free_port

    port = free_port()
    tiny = "local-steps=3 batch-size=8 crop-size=32 eval-frames=2"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "simulations" / "deploy_local.py"),
            str(tmp_path / "w"),
            "--sites",
            "2",
            "--rounds",
            "2",
            "--port",
            str(port),
            "--frames",
            "12",
            "--check-intruder",
            "--cautious-site",
            "--run-config",
            tiny,
            "--run-config",
            f"{tiny} noise-multiplier=0.0",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    first, second = result["runs"]
    assert proc.returncode == 0 and first["status"] == second["status"] == "finished:completed", proc.stdout
    assert result["tls"] is True and result["auth"] is True  # TLS and registered SuperNode keys (the defaults)
    assert result["intruder_refused"] is True  # a SuperNode whose key was never registered cannot join
    ledgers = []
    for i in range(2):
        site = tmp_path / "w" / f"site_{i}"
        assert len(list((site / "out").glob("*.lvc"))) == 2
        ledger = json.loads((site / "state" / "privacy_ledger.json").read_text())
        assert sum(n for _, _, n in ledger["history"]) == 2 * 3  # the first run's two rounds only
        ledgers.append(ledger["history"])
    # The non-private run: every round declined by every site's policy, the global model kept, the run
    # completed; the sites' ledgers hold the first run's spending only.
    refused = json.loads((Path(second["server_out"]) / "history.json").read_text())["rounds"]
    for r in refused:
        assert r["kept_previous_model"] and r["sites_trained"] == 0
        for name in ("site_0", "site_1"):
            assert r["sites"][name]["declined"] and "allow-non-private" in r["sites"][name]["declined_reason"]
    kept, public = load_model(Path(second["server_out"]) / "final.safetensors").state_dict(), load_model().state_dict()
    assert all(torch.equal(kept[k], public[k]) for k in public)
    # The cautious site (--trusted-entities) ran nothing: dropped every round of both runs, nothing written.
    for history_file in (tmp_path / "w" / "server" / "history.json", Path(second["server_out"]) / "history.json"):
        for r in json.loads(history_file.read_text())["rounds"]:
            assert [d["reason"] for d in r["dropped"]] == ["The FAB could not be verified."]
    assert not list((tmp_path / "w" / "site_2").glob("*/*.lvc"))
    assert not (tmp_path / "w" / "site_2" / "state" / "privacy_ledger.json").exists()
    # Nothing we started is left listening (deploy_local waited for every process it stopped to exit).
    assert socket.socket().connect_ex(("127.0.0.1", port)) != 0
    # A site's compressed video (the last run's final compression) decodes with that run's final global model.
    from client.cli import main as cli

    model = Path(second["server_out"]) / "final.safetensors"
    lvc = next((tmp_path / "w" / "site_0" / "out").glob("*.lvc"))
    assert cli(["decompress", str(lvc), str(tmp_path / "d.mkv"), "--model", str(model), "--quiet"]) == 0
    from common.data.video import read_frames

    assert read_frames(tmp_path / "d.mkv").shape == (12, 120, 160, 3)


@pytest.mark.slow
def test_a_federation_in_which_every_site_declines_ends_cleanly(tmp_path):
    """The issue's run (budget 1.0 at σ 0.8): every site declines every round. The run completes, each round
    keeps the global model and says so, and the final model is the last one kept (here the public one). Only a
    round a site trained in unlocks its releases (issue 33): each site compresses its own video with the final
    model but releases no summary, and refuses query.rd."""
    from common.checkpoint import load_model

    out = tmp_path / "out"
    config = TINY_RUN.replace("epsilon-budget=50.0", "epsilon-budget=1.0").replace(
        "noise-multiplier=1.0", "noise-multiplier=0.8"
    )
    rounds = _simulate(tmp_path, config, out)
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["kept_previous_model"] and r["sites_trained"] == 0
        assert all("past its budget" in s["declined_reason"] for s in r["sites"].values())
    final, public = load_model(out / "final.safetensors").state_dict(), load_model().state_dict()
    assert all(torch.equal(final[k], public[k]) for k in public)
    assert {p.parent.name for p in (tmp_path / "runs" / "sites").glob("*/*.lvc")} == {"site_0", "site_1"}
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["sites"]) == {"site_0", "site_1"} and all(s["epsilon"] == 0 for s in summary["sites"].values())
    assert all("bytes" not in s and s["gain_over_public"] is None for s in summary["sites"].values())
    assert all(s["releases"]["compress-summary"] == 0 for s in summary["sites"].values())


def test_resume_from_a_round_checkpoint_continues_round_numbering(tmp_path):
    from common.checkpoint import save_model
    from server.recorder import earlier_ledgers, history_rounds, initial_model

    model = _model(3)
    save_model(tmp_path / "round_003.safetensors", model, {"round": 3})
    # A round 4 written after the checkpoint is dropped from the model's history...
    rounds = [
        {"round": r, "sites": {"site_0": {"dp_history": [[1.0, 0.1, 2 * r]], "unit_frames": 1}}} for r in (1, 2, 3, 4)
    ]
    (tmp_path / "history.json").write_text(json.dumps({"rounds": rounds}))
    rc = RunConfig.from_mapping({"resume-from": str(tmp_path / "round_003.safetensors")})
    resumed, done, earlier = initial_model(rc)
    assert done == 3 and [r["round"] for r in earlier] == [1, 2, 3]
    assert all(torch.equal(resumed.state_dict()[k], v) for k, v in model.state_dict().items())
    # ... but not from the sites' privacy ledgers: its updates were released, its privacy is spent.
    assert earlier_ledgers(history_rounds(rc), rc)["site_0"]["history"] == [[1.0, 0.1, 8]]


@pytest.mark.slow
def test_a_site_that_crashes_mid_round_does_not_sink_the_round(tmp_path):
    """Site 1 crashes in round 2 (tests/fault_mod.py, in the ClientApp Flower loads from the run's app bundle):
    FedAvg completes with the others and history.json records who dropped."""
    app = app_with_faults(tmp_path / "fedlvc-faults", [Fault(site=1, round=2)])
    config = TINY_RUN.replace("num-server-rounds=2", "num-server-rounds=3") + " min-sites=2"
    rounds = _simulate(tmp_path, config, tmp_path / "out", sites=3, app=app)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[0]["dropped"] == [] and rounds[2]["dropped"] == []
    assert [d["site"] for d in rounds[1]["dropped"]] == ["site_1"]
    assert "fault injected" in rounds[1]["dropped"][0]["reason"]
    assert set(rounds[1]["sites"]) >= {"site_0", "site_2"} and "site_1" not in {
        k for k, v in rounds[1]["sites"].items() if "epsilon" in v
    }
    assert "site_1" in rounds[2]["sites"]  # back in the next round


@pytest.mark.slow
def test_central_site_level_dp_clips_updates_and_accounts_per_round(tmp_path):
    """central-dp=fixed: Flower's client-side clipping wrapper. With a tiny clipping norm the global model
    can hardly move, whatever the sites do; history.json carries the site-level ε of each round."""
    from common.checkpoint import load_model

    out = tmp_path / "out"
    config = (
        TINY_RUN.replace("noise-multiplier=1.0", "noise-multiplier=0.0")
        + " central-dp='fixed' central-clipping-norm=1e-6 central-noise-multiplier=0.5 learning-rate=0.01"
    )
    rounds = _simulate(tmp_path, config, out)
    central = [r["central_dp"] for r in rounds]
    assert [c["rounds"] for c in central] == [1, 2] and all(c["unit"] == "site" for c in central)
    for c in central:
        assert c["epsilon"] == pytest.approx(independent_epsilon([0.5], [1.0], [c["rounds"]], c["delta"]), rel=1e-9)
    assert central[0]["epsilon"] < central[1]["epsilon"]
    start, final = load_model().state_dict(), load_model(out / "final.safetensors").state_dict()
    # Two rounds, each site's update clipped to 1e-6, noise std 0.5 * 1e-6 / 2 per coordinate.
    drift = max((final[k] - start[k]).abs().max().item() for k in start)
    assert drift < 2e-5


def _kill_everything_of(home: Path) -> None:
    """SIGKILL every process started with ``FLWR_HOME=home``: the SuperLink, SuperExec, the simulation's
    ServerApp and workers, whatever session they put themselves in — a server machine going down."""
    mark = f"FLWR_HOME={home}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            started_with = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if mark in started_with:
            try:
                os.kill(int(proc.name), 9)
            except ProcessLookupError:
                pass


@pytest.mark.slow
def test_a_killed_server_resumes_from_its_last_checkpoint(tmp_path):
    """Kill the whole SuperLink (ServerApp included) after round 1 is checkpointed, then resume from it:
    round numbering and history.json continue, and the run completes."""
    from simulations.local_runtime import SimulationRuntime, flwr_bin, flwr_env

    out = tmp_path / "out"
    config = TINY_RUN.replace("num-server-rounds=2", "num-server-rounds=3") + f" out-dir='{out}'"
    (tmp_path / "first").mkdir()
    runtime = SimulationRuntime(tmp_path / "first").__enter__()
    try:
        run = subprocess.Popen(
            [
                flwr_bin("flwr"),
                "run",
                str(REPO),
                "sim",
                "--stream",
                "--run-config",
                config,
                "--federation-config",
                "num-supernodes=2 client-resources-num-cpus=1",
            ],
            cwd=runtime.workdir,
            env=flwr_env(runtime.home),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 600
        while not (out / "round_001.safetensors").is_file() and time.time() < deadline:
            time.sleep(0.5)
        assert (out / "round_001.safetensors").is_file()
        _kill_everything_of(runtime.home)  # the SuperLink and everything it started: no clean shutdown
        runtime.process.wait()
        run.wait(timeout=120)
    finally:
        runtime.__exit__(None, None, None)
    assert not (out / "final.safetensors").exists()
    # Rounds the killed run finished after round 1 (if any) count for the sites' privacy, not for the model.
    killed = json.loads((out / "history.json").read_text())["rounds"]
    spent = {k: sum(n for _, _, n in s["dp_history"]) for r in killed for k, s in r["sites"].items()}
    assert spent and all(n >= 3 for n in spent.values())  # local-steps=3, at least round 1
    (tmp_path / "second").mkdir()
    with SimulationRuntime(tmp_path / "second") as again:
        resumed = again.run(
            TINY_RUN.replace("num-server-rounds=2", "num-server-rounds=1")
            + f" out-dir='{out}' resume-from='{out / 'round_001.safetensors'}'",
            num_supernodes=2,
            timeout=900,
        )
    assert resumed["status"] == "finished:completed", resumed["output"][-3000:]
    history = json.loads((out / "history.json").read_text())
    assert [r["round"] for r in history["rounds"]] == [1, 2]
    assert (out / "round_002.safetensors").is_file() and (out / "final.safetensors").is_file()
    # The simulated sites keep no ledger on disk: their ε continues from the server's record of the killed run.
    first, second = history["rounds"][0]["sites"], history["rounds"][1]["sites"]
    assert set(first) == set(second) == set(spent) == {"site_0", "site_1"}
    for key, s in second.items():
        assert sum(n for _, _, n in first[key]["dp_history"]) == 3  # local-steps=3
        assert sum(n for _, _, n in s["dp_history"]) == spent[key] + 3  # equal (σ, q) entries merge
        assert s["epsilon"] == pytest.approx(independent_epsilon(*zip(*s["dp_history"]), s["delta"]), rel=1e-9)
        assert s["epsilon"] > first[key]["epsilon"]


@pytest.mark.slow
def test_central_dp_with_adaptive_clipping_adapts_the_norm_and_accounts(tmp_path):
    config = (
        TINY_RUN.replace("noise-multiplier=1.0", "noise-multiplier=0.0")
        + " central-dp='adaptive' central-clipping-norm=1e-4 central-noise-multiplier=0.5"
        " central-count-stddev=1.0 central-target-quantile=0.5 central-clip-lr=0.5"
    )
    central = [r["central_dp"] for r in _simulate(tmp_path, config, tmp_path / "out")]
    assert [c["mode"] for c in central] == ["adaptive", "adaptive"]
    assert central[0]["clipping_norm"] == pytest.approx(1e-4)
    # Every update is far larger than 1e-4, so (up to the count noise) the norm grows towards the quantile.
    assert central[1]["clipping_norm"] != pytest.approx(1e-4)
    for c in central:
        assert c["epsilon"] == pytest.approx(independent_epsilon([0.5], [1.0], [c["rounds"]], c["delta"]), rel=1e-9)


# Flower's round timeout is the only way the server gives up a silent site, so the stalled-site run waits it out
# once: generous (a healthy TINY_RUN round takes seconds; a cold start on a loaded 2-core machine tens of them),
# fixed, never derived from a measurement. The logic without the wait: test_server_checks' stub grid.
STALL_ROUND_TIMEOUT_S = 240.0


@pytest.mark.slow
def test_a_site_that_times_out_does_not_sink_the_round(tmp_path):
    """Site 1 stalls in round 1 (tests/fault_mod.py) until the server has closed that round (its checkpoint
    round_001 exists), so it cannot reply within any round-timeout; the healthy sites have a generous one. The
    stalled site is dropped for the timeout, the others train, and the run goes on."""
    out = tmp_path / "out"
    stall = Fault(site=1, round=1, action="hang", until=str(out / "round_001.safetensors"))
    app = app_with_faults(tmp_path / "fedlvc-faults", [stall])
    config = f"{TINY_RUN} min-sites=2 round-timeout={STALL_ROUND_TIMEOUT_S}"
    rounds = _simulate(tmp_path, config, out, sites=3, app=app)
    assert [r["round"] for r in rounds] == [1, 2]
    dropped = rounds[0]["dropped"]
    assert len(dropped) == 1 and "timeout" in dropped[0]["reason"], dropped
    assert {k for k, v in rounds[0]["sites"].items() if "epsilon" in v} == {"site_0", "site_2"}


def test_segment_privacy_unit_trains_the_temporal_prior_and_accounts_per_segment():
    """privacy-unit = segment: a row is segment-frames consecutive frames, q and the units count segments,
    the P-frame prior is trained (it is frozen under frame rows), and ε matches an independent accountant."""
    run = {"privacy-unit": "segment", "segment-frames": 3, "demo-frames": 24, "eval-frames": 3}
    ctx, model = _context(run), _model(5)
    reply = client_app.train(_message(model, "train"), ctx)
    m = reply.content["metrics"]
    # 24 frames - 1 held-out segment = 7 segments of 3 frames; Poisson rate 1/ceil(7/4)
    assert m["units"] == 7 and m["unit-frames"] == 3 and m["num-examples"] == 7
    assert m["sample_rate"] == pytest.approx(1 / 2)
    assert m["epsilon"] == pytest.approx(
        independent_epsilon(m["dp_sigma"], m["dp_sample_rate"], m["dp_steps"], m["delta"]), rel=1e-9
    )
    after = reply.content["arrays"].to_torch_state_dict()
    assert not torch.equal(after["temporal.table.weight"], model.state_dict()["temporal.table.weight"])
    frame_reply = client_app.train(_message(model, "train"), _context())
    frame_after = frame_reply.content["arrays"].to_torch_state_dict()
    assert torch.equal(frame_after["temporal.table.weight"], model.state_dict()["temporal.table.weight"])
    assert frame_reply.content["metrics"]["unit-frames"] == 1


@pytest.mark.slow
def test_simulation_with_segment_privacy_unit_records_the_unit(tmp_path):
    """The same ServerApp/ClientApp train the temporal model on segments; history.json names the unit and
    each site's final compression is an I+P stream."""
    from common.coding import bitstream as bs

    out = tmp_path / "out"
    rounds = _simulate(tmp_path, f"{TINY_RUN} privacy-unit='segment' segment-frames=3 gop=4", out)
    for site in ("site_0", "site_1"):
        s = rounds[-1]["sites"][site]
        assert s["privacy_unit"] == "segment" and s["unit_frames"] == 3 and s["units"] >= 1
        lvc = sorted((tmp_path / "runs" / "sites" / site).glob("*.lvc"))[0]
        with open(lvc, "rb") as f:
            header = bs.read_header(f, lvc.stat().st_size)
        assert header.gop == 4 and header.version == bs.VERSION


def test_a_v4_model_trains_under_dp_and_answers_queries_without_sending_its_tables():
    """Architecture v4 in a federated round: every parameter gets DP noise (GDN kept non-negative), the reply
    carries exactly the state_dict (the integer coding tables stay out of FedAvg), and the site codes with the
    model it received (query.rd compresses at every quality)."""
    torch.manual_seed(5)
    model = FedlvcCodec(CodecConfig.v4(channels=8, latent_channels=8, hyper_channels=8, mixtures=2))
    ctx = _context()
    reply = client_app.train(_message(model, "train"), ctx)
    m = reply.content["metrics"]
    assert m["declined"] == 0 and m["steps"] == RUN["local-steps"] and m["epsilon"] > 0
    after = reply.content["arrays"].to_torch_state_dict()
    before = model.state_dict()
    assert set(after) == set(before) and not any(k.startswith("tables.") for k in after)
    assert all(
        not torch.equal(before[k], after[k]) for k in before if not k.startswith("temporal.")
    )  # noise everywhere
    gdn = [k for k in after if k.endswith(".conv.weight") and k.startswith(("g_a.", "g_s."))]
    assert gdn and all((after[k] >= 0).all() for k in gdn)
    trained = FedlvcCodec(model.cfg)
    trained.load_state_dict(after)
    rd = client_app.rd(_rd_message(trained, model), ctx).content["metrics"]
    assert len(rd["bpp-federated"]) == model.cfg.num_levels and all(b > 0 for b in rd["bpp-federated"])


def test_a_personal_model_stays_at_the_site_and_only_it_decodes_the_sites_streams(tmp_path, monkeypatch):
    """personal-steps: the site fine-tunes the final model's entropy parameters on its own frames (no noise),
    keeps the result in its own folder, compresses with it and measures it in query.rd; no reply carries it,
    its streams name its fingerprint (the global model refuses them), and it is trained once."""
    from common.checkpoint import fingerprint, load_model
    from common.codec import decompress_file, open_stream

    monkeypatch.chdir(tmp_path)  # a simulated site without state-dir keeps it under runs/sites/<site>
    ctx, model = _context({"personal-steps": 4}), _model(11)
    client_app.train(_message(model, "train"), ctx)
    reply = client_app.compress(_message(model, "query.compress"), ctx)
    assert set(reply.content.keys()) == {"metrics", "site"} and reply.content["metrics"]["personal"] == 1
    (stored,) = (tmp_path / "runs" / "sites" / "site_0" / "personal").glob("personal-*.safetensors")
    personal = load_model(stored)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, personal.state_dict()[k])}
    assert changed == {"gain.log_gain.weight", "inv_gain.log_gain.weight", "prior.table.weight"}
    streams = sorted((tmp_path / "runs" / "sites" / "site_0").glob("*.lvc"))
    assert streams
    f, header, _ = open_stream(streams[0])
    f.close()
    assert header.fingerprint == fingerprint(personal) != fingerprint(model)
    with pytest.raises(FedlvcError, match="different model"):
        decompress_file(streams[0], tmp_path / "x.mkv", model)
    when = stored.stat().st_mtime_ns
    rd = client_app.rd(_rd_message(model, _model(12)), ctx).content["metrics"]
    assert len(rd["bpp-personal"]) == len(rd["psnr-personal"]) == model.cfg.num_levels
    assert rd["bpp-personal"] != rd["bpp-federated"]  # its own entropy parameters
    assert stored.stat().st_mtime_ns == when  # the same personal model, not trained again


@pytest.mark.parametrize("parts", ["adapters", "all"])
def test_personal_parts_choose_what_the_personal_model_moves(tmp_path, monkeypatch, parts):
    """personal-parts: adapters adds FiLM adapters to the final model and moves only them; all moves the
    transforms as well (the frame-row reachable parameters); either way the personal model codes the site's
    streams and the model it came from stays as it was."""
    from common.checkpoint import load_model

    monkeypatch.chdir(tmp_path)
    ctx, model = _context({"personal-steps": 3, "personal-parts": parts, "learning-rate": 0.01}), _model(14)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    client_app.train(_message(model, "train"), ctx)
    reply = client_app.compress(_message(model, "query.compress"), ctx)
    assert reply.content["metrics"]["personal"] == 1
    (stored,) = (tmp_path / "runs" / "sites" / "site_0" / "personal").glob(f"personal-*-{parts}.safetensors")
    personal = load_model(stored).state_dict()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    changed = {k for k in personal if k not in before or not torch.equal(personal[k], before[k])}
    if parts == "adapters":
        assert changed and all(".film." in k for k in changed)
    else:
        assert any(k.startswith("g_a.") for k in changed) and any(k.startswith("g_s.") for k in changed)
        assert not any(k.startswith("temporal.") for k in changed)  # frame rows do not reach the P-frame prior


def test_personal_learning_rate_is_the_personal_fine_tunings_own(tmp_path, monkeypatch):
    """personal-learning-rate: the personal fine-tuning's Adam rate (0: the run's learning-rate); a personal model
    trained at another rate is another model (its own file, other weights)."""
    from common.checkpoint import load_model

    monkeypatch.chdir(tmp_path)
    model = _model(15)
    folder = tmp_path / "runs" / "sites" / "site_0" / "personal"
    stored = {}
    for lr in (0.0, 0.05):
        ctx = _context({"personal-steps": 3, "personal-parts": "all", "personal-learning-rate": lr})
        client_app.train(_message(model, "train"), ctx)
        assert client_app.compress(_message(model, "query.compress"), ctx).content["metrics"]["personal"] == 1
        (stored[lr],) = set(folder.glob("personal-*.safetensors")) - set(stored.values())
    assert stored[0.05].name.endswith("-all-lr0.05.safetensors") and stored[0.0].name.endswith("-all.safetensors")
    a, b = (load_model(stored[lr]).state_dict() for lr in (0.0, 0.05))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert load_model(stored[0.05]).state_dict() and json.loads(stored[0.05].with_suffix(".json").read_text())["meta"][
        "lr"
    ] == pytest.approx(0.05)


def test_a_site_keeps_no_personal_model_beyond_its_step_limit_or_without_a_state_dir(tmp_path, monkeypatch):
    from client.personal import personal_dir

    monkeypatch.chdir(tmp_path)
    ctx, model = _context({"personal-steps": 5}, {"max-local-steps": 4}), _model(13)
    client_app.train(_message(model, "train"), ctx)
    reply = client_app.compress(_message(model, "query.compress"), ctx)
    assert reply.content["metrics"]["personal"] == 0
    assert "max-local-steps 4" in reply.content["site"]["note"]
    assert not (tmp_path / "runs" / "sites" / "site_0" / "personal").exists()
    assert personal_dir({"video-dir": "/x"}, "a") is None  # real video: only under its state-dir
    assert personal_dir({"video-dir": "/x", "state-dir": str(tmp_path)}, "a") == tmp_path / "personal"


def test_large_poisson_batches_in_pieces_account_one_step_per_batch():
    """max-physical-batch: a site takes batches of 16 expected rows in pieces of 2; Opacus accounts exactly the
    steps the ledger booked (the round would fail otherwise) and ε matches an independent computation."""
    ctx, model = _context({"batch-size": 16, "max-physical-batch": 2}), _model(21)
    m = client_app.train(_message(model, "train"), ctx).content["metrics"]
    assert m["declined"] == 0 and sum(m["dp_steps"]) == RUN["local-steps"]
    assert m["epsilon"] == pytest.approx(
        independent_epsilon(m["dp_sigma"], m["dp_sample_rate"], m["dp_steps"], m["delta"])
    )


def test_train_parts_adapters_moves_only_the_adapters_which_start_as_the_identity():
    """train-parts = adapters: FiLM adapters added to the public model code exactly as it did (identity), and a
    DP round moves them and nothing else (1,920 parameters of the shipped architecture)."""
    from common.net.model import with_adapters

    model = _model(8)
    adapted = with_adapters(model).eval()
    x, levels = torch.rand(2, 3, 32, 32), torch.tensor([1, 4])
    with torch.no_grad():
        assert torch.equal(model.eval()(x, levels)["x_hat"], adapted(x, levels)["x_hat"])
    reply = client_app.train(_message(adapted, "train"), _context({"train-parts": "adapters"}))
    before, after = adapted.state_dict(), reply.content["arrays"].to_torch_state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".film." in k for k in changed)
    assert changed == {k for k in before if ".film." in k}


def test_a_motion_model_trains_its_motion_parts_under_dp_and_codes_with_them():
    """train-parts = motion (segments): a DP round moves exactly the residual codec of the motion-compensated
    P-frames (every one of its parameters noised), nothing else; the site's rd answer codes I+P with motion."""
    from common.net.model import with_motion

    model = with_motion(_model(13))
    ctx = _context({"train-parts": "motion", "privacy-unit": "segment", "segment-frames": 3})
    reply = client_app.train(_message(model, "train"), ctx)
    m = reply.content["metrics"]
    assert m["declined"] == 0 and m["steps"] == RUN["local-steps"] and m["epsilon"] > 0
    before, after = model.state_dict(), reply.content["arrays"].to_torch_state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if k.startswith("res_")}
    trained = FedlvcCodec(model.cfg)
    trained.load_state_dict(after)
    rd = client_app.rd(_rd_message(trained, model), ctx).content["metrics"]
    assert len(rd["bpp-federated"]) == model.cfg.num_levels and all(b > 0 for b in rd["bpp-federated"])
    with pytest.raises(FedlvcError, match="needs privacy-unit = segment"):
        RunConfig.from_mapping({"train-parts": "motion"})
