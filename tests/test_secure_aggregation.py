"""Secure aggregation (run config ``secure-aggregation``): Flower's SecAgg+ between our ServerApp's FedAvg and
each site's ClientApp, run in this process over a loopback grid that hands every message to the sites' real
ClientApp (its mods included) — the same messages Flower carries in simulation and deployment."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from client import app as client_app
from common.config.fedconfig import RunConfig
from common.errors import FedlvcError
from common.net.model import FedlvcCodec
from server.strategy import SiteFedAvg
from tests.fault_mod import Fault, faulty_app
from tests.test_federation import RUN as FEDERATION_RUN
from tests.test_federation import TINY

REPO = Path(__file__).resolve().parent.parent
RUN = {  # test_federation's tiny sites and model, without noise: training is then deterministic, so the sum
    **FEDERATION_RUN,  # can be checked against each site's own update
    "local-steps": 2,
    "noise-multiplier": 0.0,
    "learning-rate": 0.01,
    "min-sites": 3,
}


pytestmark = pytest.mark.usefixtures("flower_task_identity")  # tests/conftest.py


class LoopbackGrid:
    """A Grid whose sites are ClientApps in this process: every message goes through ``app`` (the site's
    ClientApp, ``client_app.app`` unless told) with the site's own Context (its state carries the SecAgg+ keys
    between stages); an exception becomes an error reply, as Flower makes it. ``sent``/``received`` keep every
    message either way."""

    def __init__(self, contexts: dict[int, Context], app=None):
        self.contexts, self.app, self.sent, self.received = contexts, app or client_app.app, [], []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            self.sent.append(msg)
            delivered = copy.deepcopy(msg)  # as if serialised: one site's mod must not change another's message
            try:
                reply = self.app(delivered, self.contexts[msg.metadata.dst_node_id])
            except Exception as e:  # noqa: BLE001 - what Flower's runtime turns into an error reply
                reply = Message(Error(code=1, reason=f"{type(e).__name__}: {e}"), reply_to=msg)
            replies.append(reply)
        self.received += replies
        return replies


def _contexts(run: dict, node_configs: dict[int, dict] | None = None) -> dict[int, Context]:
    return {
        nid: Context(
            run_id=1,
            node_id=nid,
            node_config={"partition-id": i, "num-partitions": 3, **(node_configs or {}).get(i, {})},
            state=RecordDict(),
            run_config=run,
        )
        for i, nid in enumerate((101, 202, 303))
    }


def _global() -> FedlvcCodec:
    torch.manual_seed(0)
    return FedlvcCodec(TINY)


def _train_config(model: FedlvcCodec) -> ConfigRecord:
    return ConfigRecord({"model-config": json.dumps(model.cfg.to_dict()), "central-dp": "off", "earlier-ledgers": "{}"})


def _plain_update(model: FedlvcCodec, context: Context) -> dict[str, np.ndarray]:
    """What the site's update is when it trains in the open (a plain FedAvg round, a fresh context)."""
    config = _train_config(model)
    config["server-round"] = 1
    msg = Message(
        RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": config}), dst_node_id=1, message_type="train"
    )
    fresh = Context(
        run_id=1,
        node_id=context.node_id,
        node_config=context.node_config,
        state=RecordDict(),
        run_config=context.run_config,
    )
    reply = client_app.train(msg, fresh)
    trained = reply.content["arrays"].to_torch_state_dict()
    return {k: (trained[k].double() - v.double()).numpy() for k, v in model.state_dict().items()}


def _secure_round(run: dict, node_configs=None, app=None):
    model, contexts = _global(), _contexts(run, node_configs)
    grid = LoopbackGrid(contexts, app)
    fedavg = SiteFedAvg(RunConfig.from_mapping(run), min_train_nodes=3, min_available_nodes=3)
    sent = ArrayRecord(model.state_dict())
    assert fedavg.configure_train(1, sent, _train_config(model), grid) == []  # the round ran as SecAgg+
    arrays, _ = fedavg.aggregate_train(1, [])
    return model, contexts, grid, fedavg, arrays


def test_the_server_gets_the_mean_update_and_never_one_sites_update():
    run = {**RUN, "secure-aggregation": True}
    model, contexts, grid, fedavg, arrays = _secure_round(run)
    updates = [_plain_update(model, c) for c in contexts.values()]
    expected = {k: np.mean([u[k] for u in updates], axis=0) for k in updates[0]}
    result = arrays.to_torch_state_dict()
    for k, v in model.state_dict().items():
        got = result[k].double().numpy() - v.double().numpy()
        # SecAgg+ quantizes each coordinate stochastically to 16 / 2^22 (clipping range ±8, 2^22 levels).
        np.testing.assert_allclose(got, expected[k], rtol=0, atol=2e-5)
    moved = max(float(np.abs(e).max()) for e in expected.values())
    assert moved > 1e-3  # the sites really trained: the check above is not a comparison of zeros
    log = fedavg.train_log[1]
    assert log["sites_trained"] == 3 and log["secure_aggregation"]["sites_in_sum"] == 3
    assert log["secure_aggregation"]["completed"] and log["secure_aggregation"]["threshold"] == 2
    assert sorted(log["sites"]) == ["site_0", "site_1", "site_2"]
    # What reached the server from each site: no array data at all, and a masked vector that is not its update.
    masked = [r for r in grid.received if "metrics" in r.content.metric_records]
    assert len(masked) == 3
    for reply in masked:
        assert all(len(rec) == 0 for rec in reply.content.array_records.values())
        vector = [bytes_to_ndarray(b) for b in reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
        site = list(contexts).index(reply.metadata.src_node_id)
        # The site's update as SecAgg+ quantizes it before masking (after the weight element it prepends).
        flat_update = np.concatenate([updates[site][k].ravel() for k in model.state_dict()])
        unmasked = (flat_update + 8.0) * (2**22 / 16.0)
        flat_masked = np.concatenate([v.ravel() for v in vector]).astype(np.float64)[1:]
        assert flat_masked.size == unmasked.size
        assert np.mean(np.abs(flat_masked - unmasked) < 1000) < 0.01  # the mask hides every coordinate
        assert flat_masked.max() > 2**31  # uniform over [0, 2^32): far outside the quantized range


def test_a_site_that_drops_mid_protocol_and_one_that_declines_are_left_out_of_the_mean():
    """Site 2 crashes in the masked-vector stage (its pairwise masks are then removed with the others' key
    shares; tests/fault_mod.py's mod, inside SecAgg+'s); site 1's policy refuses the non-private round (weight 0,
    zero update). The mean is site 0's."""
    run = {**RUN, "secure-aggregation": True}
    crash = faulty_app([Fault(site=2, round=1)])
    model, contexts, grid, fedavg, arrays = _secure_round(run, {1: {"allow-non-private": "false"}}, crash)
    expected = _plain_update(model, list(contexts.values())[0])
    result = arrays.to_torch_state_dict()
    for k, v in model.state_dict().items():
        np.testing.assert_allclose(result[k].double().numpy() - v.double().numpy(), expected[k], atol=2e-5)
    log = fedavg.train_log[1]
    assert log["sites_trained"] == 1 and log["secure_aggregation"]["sites_in_sum"] == 1
    assert log["sites"]["site_1"]["declined"] and "allow-non-private" in log["sites"]["site_1"]["declined_reason"]
    assert [d["node_id"] for d in log["dropped"]] == [303] and "fault injected" in log["dropped"][0]["reason"]


def test_a_round_in_which_nobody_trains_keeps_the_model():
    run = {**RUN, "secure-aggregation": True}
    everyone_declines = {i: {"allow-non-private": "false"} for i in range(3)}
    _, _, _, fedavg, arrays = _secure_round(run, everyone_declines)
    assert arrays is None
    assert fedavg.train_log[1]["secure_aggregation"]["note"] == "no site trained"


def test_a_site_that_requires_secure_aggregation_declines_a_plain_round_and_trains_under_secagg():
    model = _global()
    node = {"require-secure-aggregation": "true"}
    context = _contexts(RUN, {0: node})[101]
    config = _train_config(model)
    config["server-round"] = 1
    plain = Message(
        RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": config}), dst_node_id=101, message_type="train"
    )
    reply = client_app.app(plain, context)
    assert reply.content["metrics"]["declined"] == 1
    assert "requires secure aggregation" in reply.content["site"]["note"]
    _, _, _, fedavg, arrays = _secure_round({**RUN, "secure-aggregation": True}, {i: node for i in range(3)})
    assert arrays is not None and fedavg.train_log[1]["sites_trained"] == 3


def test_secure_aggregation_refuses_central_dp_and_a_single_site():
    with pytest.raises(FedlvcError, match="cannot be combined with central-dp"):
        RunConfig.from_mapping({"secure-aggregation": True, "central-dp": "fixed"})
    with pytest.raises(FedlvcError, match="min-sites >= 2"):
        RunConfig.from_mapping({"secure-aggregation": True, "min-sites": 1})


TINY_RUN = (
    "num-server-rounds=2 local-steps=3 batch-size=8 crop-size=32 demo-frames=16 demo-clips=1 "
    "demo-width=64 demo-height=48 eval-frames=2 noise-multiplier=1.0 epsilon-budget=50.0"
)


def _check_secure_rounds(rounds: list, sites: int) -> None:
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        secure = r["secure_aggregation"]
        assert secure["completed"] and secure["sites_in_sum"] == sites and secure["shares"] == sites
        assert r["sites_trained"] == sites and not r["kept_previous_model"]
        assert all(s["epsilon"] > 0 and not s["declined"] for s in r["sites"].values())


@pytest.mark.slow
def test_simulation_with_secure_aggregation_end_to_end(tmp_path):
    """``flwr run`` with secure-aggregation=true on 3 simulated sites under DP: every round's update is the
    SecAgg+ sum, the global model moves, each site's ε is accounted and its video compressed."""
    from common.checkpoint import load_model
    from simulations.local_runtime import SimulationRuntime

    out = tmp_path / "out"
    with SimulationRuntime(tmp_path) as runtime:
        run = runtime.run(
            f"{TINY_RUN} secure-aggregation=true min-sites=3 out-dir='{out}'", num_supernodes=3, timeout=900
        )
    assert run["status"] == "finished:completed", run["output"][-3000:]
    _check_secure_rounds(json.loads((out / "history.json").read_text())["rounds"], 3)
    start, final = load_model().state_dict(), load_model(out / "final.safetensors").state_dict()
    assert max((final[k] - start[k]).abs().max().item() for k in start) > 1e-4
    for site in ("site_0", "site_1", "site_2"):
        assert list((tmp_path / "runs" / "sites" / site).glob("*.lvc"))


@pytest.mark.slow
def test_deployment_with_secure_aggregation_over_tls(tmp_path):
    """SuperLink + 3 authenticated SuperNodes over TLS whose node config requires secure aggregation, and a
    fourth (--cautious-site) that refuses every app bundle: the SecAgg+ round loses the fourth in its first
    stage, starts again with the three, and each of them trains in it (its ledger books the round)."""
    from simulations.local_runtime import free_port

    port = free_port()
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "simulations" / "deploy_local.py"),
            str(tmp_path / "w"),
            *("--sites", "3", "--rounds", "1", "--port", str(port), "--frames", "12", "--cautious-site"),
            *("--node-config", "require-secure-aggregation=true"),
            *("--run-config", "local-steps=3 batch-size=8 crop-size=32 eval-frames=2 secure-aggregation=true"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and result["status"] == "finished:completed", proc.stdout
    assert result["tls"] is True and result["auth"] is True
    (r,) = json.loads((Path(result["server_out"]) / "history.json").read_text())["rounds"]
    secure = r["secure_aggregation"]
    assert secure["completed"] and secure["sites_in_sum"] == 3 and secure["shares"] == 3
    assert len(secure["restarted_without"]) == 1 and r["sites_trained"] == 3
    assert [d["node_id"] for d in r["dropped"]] == secure["restarted_without"]
    assert "FAB could not be verified" in r["dropped"][0]["reason"]
    for i in range(3):
        ledger = json.loads((tmp_path / "w" / f"site_{i}" / "state" / "privacy_ledger.json").read_text())
        assert sum(n for _, _, n in ledger["history"]) == 3  # one round of 3 steps, spent once
        assert len(list((tmp_path / "w" / f"site_{i}" / "out").glob("*.lvc"))) == 2


def test_a_site_lost_before_the_key_shares_restarts_the_round_without_it(monkeypatch):
    """Flower's SecAgg+ cannot unmask once a node is lost in its first stage; the round starts again with the
    other sites (nobody had trained), and the mean is theirs."""
    real = client_app.app

    def offline_303(msg, context):
        if context.node_id == 303:
            raise ConnectionError("site 303 is offline")
        return real(msg, context)

    monkeypatch.setattr(client_app, "app", offline_303)
    run = {**RUN, "secure-aggregation": True}
    model, contexts, grid, fedavg, arrays = _secure_round(run)
    monkeypatch.setattr(client_app, "app", real)
    updates = [_plain_update(model, c) for c in list(contexts.values())[:2]]
    result = arrays.to_torch_state_dict()
    for k, v in model.state_dict().items():
        expected = (updates[0][k] + updates[1][k]) / 2
        np.testing.assert_allclose(result[k].double().numpy() - v.double().numpy(), expected, atol=2e-5)
    log = fedavg.train_log[1]
    assert log["secure_aggregation"]["restarted_without"] == [303] and log["secure_aggregation"]["shares"] == 2
    assert log["sites_trained"] == 2 and "site 303 is offline" in log["dropped"][0]["reason"]


def test_malformed_fitins_arrays_are_a_clear_error_at_the_site():
    from flwr.app import Array

    from client.secure import positional_state_dict

    names = list(_global().state_dict())
    good = {str(i): Array(v.numpy()) for i, v in enumerate(_global().state_dict().values())}
    assert set(positional_state_dict(ArrayRecord(good), names)) == set(names)
    with pytest.raises(FedlvcError, match="sent 1 arrays"):
        positional_state_dict(ArrayRecord({"0": good["0"]}), names)
    garbage = Array(data=b"not an npy file", dtype="", stype="numpy.ndarray", shape=())
    with pytest.raises(FedlvcError, match="malformed"):
        positional_state_dict(ArrayRecord({**good, "0": garbage}), names)
