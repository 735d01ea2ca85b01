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
from common.config.fedconfig import RunConfig
from server.recorder import RoundRecorder
from server.strategy import SiteFedAvg
from tests.test_federation import _model

pytestmark = pytest.mark.usefixtures("flower_task_identity")  # tests/conftest.py

RC = RunConfig.from_mapping({"site-max-frames": 1000})


def _sent(model) -> ArrayRecord:
    return ArrayRecord(model.state_dict())


def _reply(
    node: int,
    arrays: ArrayRecord | None,
    name: str = "site_0",
    examples=10,
    units=10,
    declined=0,
    ask: Message | None = None,
    **metrics,
) -> Message:
    """A training reply from Flower node ``node`` (to ``ask``), as an honest site sends it unless told otherwise."""
    ask = ask or Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type="train")
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
        13: _reply(  # every array right, in reverse order: averaged by position, it would mix tensors
            13, ArrayRecord({k: Array(v.numpy() + 5.0) for k, v in reversed(model.state_dict().items())}), name="order"
        ),
    }
    fedavg = _strategy(model, list(replies) + [14])
    arrays, metrics = fedavg.aggregate_train(1, list(replies.values()))
    assert metrics["sites_trained"] == 1
    expected = model.state_dict()[first_key].numpy() + 0.01
    np.testing.assert_allclose(_first(arrays), expected, rtol=1e-6)  # only the honest site's model
    log = fedavg.train_log[1]
    assert set(log["sites"]) == {"honest"}
    reasons = {d["node_id"]: d["reason"] for d in log["dropped"]}
    assert set(reasons) == set(range(2, 15))
    assert "not finite" in reasons[2] and "not finite" in reasons[3]
    assert "out of range" in reasons[4] and "out of range" in reasons[5]  # weight > units, units > site-max-frames
    assert "expected float32[" in reasons[6] and "extra ['extra']" in reasons[7] and "float64" in reasons[8]
    assert "not a number" in reasons[9] and "ArrayRecord" in reasons[10] and "malformed" in reasons[11]
    assert reasons[12] == "site crashed" and "another order" in reasons[13] and "timeout" in reasons[14]


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
    from server.queries import query
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
    out = query(grid, rc, "compress", {}, {"quality": 4}, fedavg, lambda r: checked_compress_summary(r) or {})
    assert grid.timeout == 90.0
    assert out["site_0"]["bytes"] == 100
    assert out["node_2"] == {"dropped": "no reply to query.compress within round-timeout (90 s)"}


# ------------------------------------------------ issue 33: a hostile site against server.app.main, over the wire


def _over_the_wire(msg: Message) -> Message:
    """The message as the server gets it from the network: Flower's protobuf serde, to bytes and back."""
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage

    return message_from_proto(ProtoMessage.FromString(message_to_proto(msg).SerializeToString()))


def _npy(value: np.ndarray, pickle: bool = False) -> bytes:
    import io

    stream = io.BytesIO()
    np.save(stream, value, allow_pickle=pickle)
    return stream.getvalue()


def _npy_header(shape: tuple) -> bytes:
    """A float32 ``.npy`` header claiming ``shape``, without the data it announces."""
    import io

    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return stream.getvalue()


# Each replaces one array of an otherwise honest model by bytes that its dtype and shape metadata do not describe.
MALFORMED = {
    "not .npy bytes": (lambda a: b"\x00not an array" * 4, "not a .npy array"),
    "an object .npy": (lambda a: _npy(np.array([1.0, None], dtype=object), pickle=True), "decodes to object[2]"),
    "a non-numpy stype": (None, "not a numpy array"),
    "a decoded shape (3,)": (lambda a: _npy(np.zeros(3, np.float32)), "decodes to float32[3]"),
    "a decoded shape (1,)": (lambda a: _npy(np.zeros(1, np.float32)), "decodes to float32[1]"),
    "float64 bytes": (lambda a: _npy(a.numpy().astype(np.float64)), "decodes to float64"),
    "a header of 10^12 values": (lambda a: _npy_header((10**12,)), "decodes to float32[1000000000000]"),
    "data cut short": (lambda a: a.data[:-4], "bytes of data"),
}


def _malformed(arrays: ArrayRecord, kind: str) -> ArrayRecord:
    """``arrays`` with its first array's bytes made ``kind`` of MALFORMED, its metadata kept."""
    key, first = next(iter(arrays.items()))
    make, _ = MALFORMED[kind]
    stype, data = ("torch.Tensor", first.data) if make is None else (first.stype, make(first))
    return ArrayRecord({**dict(arrays.items()), key: Array(first.dtype, tuple(first.shape), stype, data)})


class StubGrid:
    """Flower's Grid for ``server.app.main``: every node answers as an honest site would (its model moved by
    0.01 each round, plausible evaluation, compression and rd figures) unless ``train[node](ask, moved model,
    round)`` makes its training reply (None: no reply that round) or it is ``silent``; every reply crosses
    Flower's wire form first. ``timeouts`` keeps the timeout of every call."""

    def __init__(self, names: dict[int, str], train: dict | None = None, silent=()):
        self.names, self.train, self.silent, self.rounds, self.timeouts = names, train or {}, set(silent), 0, []

    def get_node_ids(self):
        return list(self.names)

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train":
            self.rounds += 1
        self.timeouts.append(timeout)
        messages.sort(key=lambda m: list(self.names).index(m.metadata.dst_node_id))  # replies in ``names`` order
        replies = [self._answer(m) for m in messages if m.metadata.dst_node_id not in self.silent]
        return [_over_the_wire(r) for r in replies if r is not None]

    def _answer(self, ask: Message) -> Message:
        node, kind = ask.metadata.dst_node_id, ask.metadata.message_type
        if kind == "train":
            sent = ask.content["arrays"]
            moved = ArrayRecord({k: Array(np.asarray(a.numpy() + np.float32(0.01))) for k, a in sent.items()})
            if node in self.train:
                return self.train[node](ask, moved, self.rounds)
            return _reply(node, moved, name=self.names[node], ask=ask)
        levels = len(json.loads(ask.content["config"]["model-config"])["lambdas"])  # quality levels
        metrics = {
            "evaluate": {"bpp": 0.5, "psnr": 30.0, "ms_ssim": 0.9, "num-examples": 2},
            "query.compress": {"bytes": 100, "frames": 2, "bpp": 0.5, "psnr": 30.0, "quality": 4},
            "query.rd": {
                **{f"bpp-{m}": [0.1 * (i + 1) for i in range(levels)] for m in ("federated", "public")},
                "psnr-federated": [26.0 + i for i in range(levels)],
                "psnr-public": [25.0 + i for i in range(levels)],
            },
        }[kind]
        content = {"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": self.names[node]})}
        return Message(RecordDict(content), reply_to=ask)


def _run_main(tmp_path, grid: StubGrid, rounds: int, **run) -> tuple[list, dict]:
    """``server.app.main`` on ``grid`` with the tiny model: (history.json's rounds, summary.json)."""
    from common.checkpoint import save_model
    from server.app import main

    save_model(tmp_path / "init.safetensors", _model())
    run_config = {
        "num-server-rounds": rounds,
        "site-max-frames": 1000,
        "out-dir": str(tmp_path / "out"),
        "init-model": str(tmp_path / "init.safetensors"),
        "round-timeout": 5.0,
        **run,
    }
    main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    out = tmp_path / "out"
    return json.loads((out / "history.json").read_text())["rounds"], json.loads((out / "summary.json").read_text())


def test_a_site_sending_malformed_arrays_over_the_wire_is_dropped_every_round_and_the_run_completes(tmp_path):
    """Issue 33, item 2: array bytes that are no .npy, an object .npy, a non-numpy stype, bytes whose decoded
    shape or dtype the metadata does not say, a forged header, data cut short: one kind per round from node 3,
    through Flower's protobuf. Every round completes without it, and the model keeps its shapes."""
    from common.checkpoint import load_model

    kinds = list(MALFORMED)

    def hostile(ask, moved, server_round):
        return _reply(3, _malformed(moved, kinds[server_round - 1]), name="mallory", ask=ask)

    grid = StubGrid({1: "site_0", 2: "site_1", 3: "mallory"}, train={3: hostile})
    rounds, summary = _run_main(tmp_path, grid, len(kinds))
    assert [r["round"] for r in rounds] == list(range(1, len(kinds) + 1))
    for r, kind in zip(rounds, kinds):
        trained = {k for k, v in r["sites"].items() if "declined" in v}  # mallory still answers the evaluation
        assert r["sites_trained"] == 2 and trained == {"site_0", "site_1"}, kind
        [dropped] = r["dropped"]
        assert dropped["node_id"] == 3 and MALFORMED[kind][1] in dropped["reason"], (kind, dropped)
    start, final = _model().state_dict(), load_model(tmp_path / "out" / "final.safetensors").state_dict()
    for key, value in start.items():
        assert final[key].shape == value.shape and torch.isfinite(final[key]).all()
        torch.testing.assert_close(final[key], value + 0.01 * len(kinds), rtol=1e-5, atol=1e-5)  # the honest mean
    assert set(summary["sites"]) == {"site_0", "site_1", "mallory"}


def test_a_squatted_name_and_a_claimed_node_label_cannot_hide_or_mislabel_a_site(tmp_path, capsys):
    """Issue 33, item 4: node 9 answers first as ``school``, so the real school (node 4) is ``school@node_4``;
    node 5 calls itself ``node_6`` while node 6 stays silent. summary.json and the table give every site's node
    id, node 6 is listed as dropped under its own id, and node 5 is labelled by its own."""
    names = {9: "school", 4: "school", 5: "node_6", 6: "clinic"}
    rounds, summary = _run_main(tmp_path, StubGrid(names, silent={6}), 1)
    sites = summary["sites"]
    assert sites["school"]["node_id"] == 9 and sites["school@node_4"]["node_id"] == 4
    assert sites["node_5"]["node_id"] == 5 and "bytes" in sites["node_5"]
    assert sites["node_6"]["node_id"] == 6 and "no reply" in sites["node_6"]["dropped"]
    assert {d["node_id"]: d["site"] for d in rounds[0]["dropped"]} == {6: "node_6"}
    table = capsys.readouterr().out
    assert any(line.split()[:2] == ["school@node_4", "4"] for line in table.splitlines())
    assert any(line.split()[:2] == ["node_6", "6"] for line in table.splitlines())


def test_a_site_silent_in_a_training_round_is_dropped_from_it_and_the_round_goes_on(tmp_path):
    """What a stalled site does to a round, without waiting for a timeout: node 2 gives no training reply in round
    1 (Flower's grid returns without it once round-timeout has passed). The round averages the other two, history
    says who dropped and why, and the site trains again in round 2. test_federation checks it end to end once."""

    def stalled(ask, moved, server_round):
        return None if server_round == 1 else _reply(2, moved, name="site_1", ask=ask)

    grid = StubGrid({1: "site_0", 2: "site_1", 3: "site_2"}, train={2: stalled})
    rounds, _ = _run_main(tmp_path, grid, 2, **{"round-timeout": 240.0})
    assert set(grid.timeouts) == {240.0}  # every call waits at most round-timeout
    first, second = rounds
    assert [d["node_id"] for d in first["dropped"]] == [2] and "timeout" in first["dropped"][0]["reason"]
    trained = {k for k, v in first["sites"].items() if "epsilon" in v}  # site_1's entry is its evaluation
    assert first["sites_trained"] == 2 and trained == {"site_0", "site_2"}
    assert second["dropped"] == [] and second["sites_trained"] == 3


def _update_norm(arrays: ArrayRecord, model) -> float:
    return math.sqrt(
        sum(
            float(((a.numpy() - v.numpy()).astype(np.float64) ** 2).sum())
            for a, v in zip(arrays.values(), model.state_dict().values())
        )
    )


def test_a_well_formed_poisoned_update_is_clipped_to_the_default_bound_and_recorded():
    """Issue 33, item 6: a site's finite values of 3.4e38 no longer reach the global model: its update is
    clipped to max-update-norm (recorded for the site and round), honest updates pass untouched."""
    bound = RunConfig().max_update_norm  # the default
    model = _model()
    huge = {
        k: np.full(tuple(v.shape), np.finfo(np.float32).max, dtype=np.float32) for k, v in model.state_dict().items()
    }
    fedavg = _strategy(model, [1, 2, 3])
    replies = [
        _reply(1, _moved(model, 0.01), name="a"),
        _reply(2, _moved(model, 0.03), name="b"),
        _reply(3, _moved(model, 0.0, **huge), name="poison"),
    ]
    arrays, _ = fedavg.aggregate_train(1, replies)
    honest = _update_norm(_moved(model, 0.01), model) + _update_norm(_moved(model, 0.03), model)
    assert _update_norm(arrays, model) <= (bound + honest) / 3 * (1 + 1e-6)  # a third each, at most
    sites = fedavg.train_log[1]["sites"]
    assert sites["poison"]["clipped_to"] == bound and sites["poison"]["update_norm"] > 1e38
    assert "clipped_to" not in sites["a"] and sites["a"]["update_norm"] == pytest.approx(
        _update_norm(_moved(model, 0.01), model), rel=1e-3
    )


@pytest.mark.parametrize("rule", [{"aggregation": "median"}, {"aggregation": "trimmed-mean", "trim-fraction": 0.25}])
def test_robust_aggregation_ignores_a_minority_of_poisoned_updates_and_their_weights(rule):
    """Without any norm bound, the coordinate-wise median or trimmed mean of four sites (one poisoned, claiming
    the largest weight) stays between the honest sites' models."""
    model = _model()
    rc = RunConfig.from_mapping({"site-max-frames": 1000, "max-update-norm": 0.0, **rule})
    fedavg = SiteFedAvg(rc)
    fedavg.sent[1], fedavg.sampled[1] = _sent(model), [1, 2, 3, 4]
    replies = [_reply(n, _moved(model, 0.01 * n), name=f"s{n}") for n in (1, 2, 3)]
    replies.append(_reply(4, _moved(model, 3e38), name="poison", examples=1000, units=1000))
    arrays, _ = fedavg.aggregate_train(1, replies)
    first = model.state_dict()[next(iter(model.state_dict()))].numpy()
    # (0.02 + 0.03) / 2: the median of four, and the mean of the middle two (a quarter cut from each end)
    np.testing.assert_allclose(_first(arrays), first + 0.025, rtol=1e-5, atol=1e-6)


def test_under_secure_aggregation_the_bound_caps_the_revealed_mean_update():
    from server.secure import SecureRound

    rc = RunConfig.from_mapping({"site-max-frames": 1000, "secure-aggregation": True, "max-update-norm": 2.0})
    model = _model()
    fedavg = SiteFedAvg(rc)
    fedavg.sent[1], fedavg.sampled[1] = _sent(model), [1, 2]
    fedavg.train_log[1] = {"sites": {}, "dropped": [], "sites_trained": 2}
    base = [v.numpy().astype(np.float64) for v in model.state_dict().values()]
    mean = [np.full(b.shape, 8.0) for b in base]  # every coordinate at SecAgg+'s clipping range
    arrays, _ = fedavg._secure_result(1, base, _sent(model), SecureRound(mean_update=mean, completed=True), 2)
    assert _update_norm(arrays, model) == pytest.approx(2.0, rel=1e-4)
    record = fedavg.train_log[1]["secure_aggregation"]
    assert record["clipped_to"] == 2.0 and record["update_norm"] > 2.0


@pytest.mark.parametrize(
    "bad, why",
    [
        ({"aggregation": "median", "secure-aggregation": True}, "'aggregation' median cannot be combined"),
        ({"aggregation": "trimmed-mean", "central-dp": "fixed"}, "'aggregation' trimmed-mean cannot be combined"),
        ({"trim-fraction": 0.5}, r"'trim-fraction' must be in \[0, 0.5\)"),
        ({"max-update-norm": -1.0}, r"'max-update-norm' must be in \[0, inf\]"),
        ({"aggregation": "krum"}, "'aggregation' must be one of mean, median, trimmed-mean"),
    ],
)
def test_the_run_config_refuses_robust_aggregation_where_it_cannot_work(bad, why):
    from common.errors import FedlvcError

    with pytest.raises(FedlvcError, match=why):
        RunConfig.from_mapping(bad)
