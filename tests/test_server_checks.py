"""The server checks every reply before averaging: hostile or broken sites are dropped with the reason and
never crash the run or take over the model; sites are who Flower says they are."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from client.site import site_identity
from common.fedconfig import RunConfig
from server.app import RoundRecorder, SiteFedAvg
from tests.test_federation import _model

pytestmark = pytest.mark.usefixtures("flower_task_identity")  # tests/conftest.py

RC = RunConfig.from_mapping({"site-max-frames": 1000})


def _sent(model) -> ArrayRecord:
    return ArrayRecord(model.state_dict())


def _reply(
    node: int, arrays: ArrayRecord | None, name: str = "site_0", examples=10, units=10, declined=0, **metrics
) -> Message:
    """A training reply from Flower node ``node``, as an honest site sends it unless told otherwise."""
    ask = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type="train")
    m = {
        "num-examples": examples,
        "units": units,
        "unit-frames": 1,
        "epsilon": 1.5,
        "delta": 1e-5,
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
        "sample_rate": 0.25,
        "steps": 0 if declined else 3,
        "declined": declined,
        "dp_sigma": [1.0],
        "dp_sample_rate": [0.25],
        "dp_steps": [3],
        "train_loss": 0.5,
        **metrics,
    }
    content = {"metrics": MetricRecord(m), "site": ConfigRecord({"name": name, "note": "", "accountant": "rdp"})}
    if arrays is not None:
        content["arrays"] = arrays
    return Message(RecordDict(content), reply_to=ask)


def _moved(model, delta: float, **changes) -> ArrayRecord:
    """The model with every value moved by ``delta``; ``changes`` replace single arrays."""
    state = {k: (v + delta).numpy() for k, v in model.state_dict().items()}
    state.update(changes)
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in state.items()})


def _strategy(model, nodes, central_norm: float | None = None) -> SiteFedAvg:
    fedavg = SiteFedAvg(RC, average_all=central_norm is not None)
    fedavg.sent[1], fedavg.sampled[1] = _sent(model), list(nodes)
    if central_norm is not None:
        fedavg.clipping_norms[1] = central_norm
    return fedavg


def _first(arrays: ArrayRecord) -> np.ndarray:
    return next(iter(arrays.values())).numpy()


def test_bad_replies_are_dropped_with_the_reason_and_the_honest_average_survives():
    model = _model()
    first_key = next(iter(model.state_dict()))
    shape = tuple(model.state_dict()[first_key].shape)
    nan = np.full(shape, np.nan, dtype=np.float32)
    replies = {
        1: _reply(1, _moved(model, 0.01), name="honest"),
        2: _reply(2, _moved(model, 0.0, **{first_key: nan}), name="nan"),
        3: _reply(3, _moved(model, 0.0, **{first_key: np.full(shape, np.inf, dtype=np.float32)}), name="inf"),
        4: _reply(4, _moved(model, 5.0), name="huge-weight", examples=10**12, units=10**12),
        5: _reply(5, _moved(model, 5.0), name="more-than-it-holds", examples=500, units=10),
        6: _reply(6, _moved(model, 0.0, **{first_key: np.zeros((1, 2), dtype=np.float32)}), name="shape"),
        7: _reply(
            7,
            ArrayRecord(
                {
                    **{k: Array(v.numpy()) for k, v in model.state_dict().items()},
                    "extra": Array(np.zeros(2, dtype=np.float32)),
                }
            ),
            name="extra-key",
        ),
        8: _reply(8, _moved(model, 0.0, **{first_key: np.zeros(shape, dtype=np.float64)}), name="dtype"),
        9: _reply(9, _moved(model, 0.0), name="list-weight", examples=[1, 2]),
        10: _reply(10, None, name="no-arrays"),
        11: _reply(11, _moved(model, 0.0), name="nan-sigma", dp_sigma=[float("nan")]),
        12: Message(
            Error(code=0, reason="site crashed"), reply_to=Message(RecordDict(), dst_node_id=12, message_type="train")
        ),
    }
    fedavg = _strategy(model, list(replies) + [13])
    arrays, metrics = fedavg.aggregate_train(1, list(replies.values()))
    assert metrics["sites_trained"] == 1
    expected = model.state_dict()[first_key].numpy() + 0.01
    np.testing.assert_allclose(_first(arrays), expected, rtol=1e-6)  # only the honest site's model
    log = fedavg.train_log[1]
    assert set(log["sites"]) == {"honest"}
    reasons = {d["node_id"]: d["reason"] for d in log["dropped"]}
    assert set(reasons) == set(range(2, 14))
    assert "not finite" in reasons[2] and "not finite" in reasons[3]
    assert "out of range" in reasons[4] and "out of range" in reasons[5]  # weight > units, units > site-max-frames
    assert "expected float32[" in reasons[6] and "extra ['extra']" in reasons[7] and "float64" in reasons[8]
    assert "not a number" in reasons[9] and "ArrayRecord" in reasons[10] and "malformed" in reasons[11]
    assert reasons[12] == "site crashed" and "timeout" in reasons[13]


def test_a_spoofed_site_name_cannot_overwrite_another_sites_record():
    model = _model()
    fedavg = _strategy(model, [1, 2, 3])
    replies = [
        _reply(1, _moved(model, 0.01), name="site_0", epsilon=1.0),
        _reply(2, _moved(model, 0.02), name="site_0", epsilon=9.0),  # claims the same name
        _reply(3, _moved(model, 0.03), name="../../etc", epsilon=2.0),
    ]  # not a name: labelled by node id
    fedavg.aggregate_train(1, replies)
    sites = fedavg.train_log[1]["sites"]
    assert sites["site_0"]["epsilon"] == 1.0 and sites["site_0"]["node_id"] == 1
    assert sites["site_0@node_2"]["epsilon"] == 9.0 and sites["node_3"]["node_id"] == 3
    # Next round the labels stay pinned to the node ids, whatever a node claims now.
    fedavg.sent[2], fedavg.sampled[2] = _sent(model), [1, 2]
    fedavg.aggregate_train(2, [_reply(2, _moved(model, 0.0), name="site_0"), _reply(1, _moved(model, 0.0), name="x")])
    assert {k: v["node_id"] for k, v in fedavg.train_log[2]["sites"].items()} == {"site_0@node_2": 2, "site_0": 1}


def test_sites_without_any_node_config_key_are_distinct():
    """Deployed SuperNodes started without partition-id all used to report site 0."""
    names = {site_identity({}, node_id)[0] for node_id in (1234567, 7654321, 42)}
    numbers = {site_identity({}, node_id)[1] for node_id in (1234567, 7654321, 42)}
    assert len(names) == len(numbers) == 3


def test_under_central_dp_weights_are_equal_and_updates_clipped_whatever_the_sites_report():
    """A negative or huge weight in a reply changes nothing, and an update larger than the clipping norm S
    (a site that skipped Flower's clipping mod) is clipped by the server."""
    model = _model()
    fedavg = _strategy(model, [1, 2, 3], central_norm=1.0)
    n = sum(v.numel() for v in model.state_dict().values())
    big, small = 1000.0 / math.sqrt(n), 0.1 / math.sqrt(n)  # update norms 1000 and 0.1
    replies = [
        _reply(1, _moved(model, big), name="a", **{"site-weight": -999.0}),
        _reply(2, _moved(model, small), name="b", **{"site-weight": 1000.0}),
        _reply(3, _moved(model, 7.0), name="c", declined=1, examples=0),
    ]  # declined: a zero update
    arrays, _ = fedavg.aggregate_train(1, replies)
    expected = model.state_dict()[next(iter(model.state_dict()))].numpy() + (big / 1000.0 + small) / 3
    np.testing.assert_allclose(_first(arrays), expected, rtol=1e-5)


def test_a_round_where_every_site_declined_keeps_the_previous_model(tmp_path):
    model = _model()
    fedavg = _strategy(model, [1, 2])
    replies = [_reply(n, _moved(model, 0.5), name=f"s{n}", declined=1, examples=0) for n in (1, 2)]
    assert fedavg.aggregate_train(1, replies) == (None, None)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    recorder = RoundRecorder(tmp_path, RC, context, model, 0, [], fedavg, None)
    recorder.after_round(1, _sent(model))  # Flower passes the model it kept
    record = json.loads((tmp_path / "history.json").read_text())["rounds"][0]
    assert record["kept_previous_model"] is True and record["sites_trained"] == 0
    assert all(s["declined"] for s in record["sites"].values())
    from common.checkpoint import load_model

    kept = load_model(tmp_path / "round_001.safetensors").state_dict()
    assert all(torch.equal(kept[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "bad", [{"epsilon": float("nan")}, {"declined": 2}, {"unit-frames": 4}, {"num-examples": 0}, {"dp_steps": [3, 3]}]
)
def test_inconsistent_metrics_are_dropped(bad):
    model = _model()
    fedavg = _strategy(model, [1])
    assert fedavg.aggregate_train(1, [_reply(1, _moved(model, 0.1), **bad)]) == (None, None)
    assert len(fedavg.train_log[1]["dropped"]) == 1


def test_a_site_that_does_not_answer_a_final_query_in_time_is_listed_as_dropped():
    """A site silent past round-timeout (say, still training its personal model) is in the summary with the
    reason, not left out of it as if it never took part."""
    from server.app import _query
    from server.replies import checked_compress_summary

    class Grid:  # node 1 answers, node 2 stays silent until the timeout
        def get_node_ids(self):
            return [1, 2]

        def send_and_receive(self, messages, timeout):
            self.timeout = timeout
            ask = next(m for m in messages if m.metadata.dst_node_id == 1)
            m = {"bytes": 100, "frames": 2, "bpp": 0.5, "psnr": 30.0, "quality": 4}
            content = {"metrics": MetricRecord(m), "site": ConfigRecord({"name": "site_0"})}
            return [Message(RecordDict(content), reply_to=ask)]

    grid = Grid()
    rc = RunConfig.from_mapping({"round-timeout": 90.0})
    fedavg = SiteFedAvg(rc)
    out = _query(grid, rc, "compress", {}, {"quality": 4}, fedavg, lambda r: checked_compress_summary(r) or {})
    assert grid.timeout == 90.0
    assert out["site_0"]["bytes"] == 100
    assert out["node_2"] == {"dropped": "no reply to query.compress within round-timeout (90 s)"}
