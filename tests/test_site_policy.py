"""A site's privacy holds against the operator: the ClientApp's handlers called the way a hostile operator would
call them (crafted run configs and messages), against a site whose policy lives in its node config and whose
ledger lives on its disk."""

from __future__ import annotations

import fcntl
import json
import math
import os
import stat
import threading
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from client import app as client_app
from client.ledger import KEY, LEDGER, LOCK, SEAL, PrivacyLedger, _exclusive, open_ledger
from client.policy import SitePolicy
from common.config.fedconfig import RunConfig
from common.data.clips import generate_site_clip
from common.data.video import write_video
from common.errors import FedlvcError
from common.net.architecture import CodecConfig
from common.net.model import FedlvcCodec
from tests.conftest import allocates_at_most
from tests.test_federation import RUN, _context, _message, _model, _rd_message, independent_epsilon

pytestmark = pytest.mark.usefixtures("flower_task_identity")  # tests/conftest.py


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory) -> Path:
    """A site's real video: two small clips on disk (the site then defaults to the strict policy)."""
    folder = tmp_path_factory.mktemp("videos") / "school"
    folder.mkdir()
    for c in range(2):
        write_video(folder / f"cam_{c}.mkv", generate_site_clip(5, c, 64, 48, 8), Fraction(25))
    return folder


def _real_site(tmp_path: Path, video_dir: Path, **node) -> dict:
    return {"video-dir": str(video_dir), "state-dir": str(tmp_path / "state"), **node}


def _train(run=None, node=None, server_round: int = 1, ctx=None, model=None):
    ctx = ctx or _context(run, node)
    reply = client_app.train(_message(model or _model(), "train", server_round), ctx)
    return reply, ctx


def _ledger(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "state" / LEDGER).read_text())


def _unchanged(msg_model, reply) -> bool:
    sent, back = msg_model.state_dict(), reply.content["arrays"].to_torch_state_dict()
    return all(torch.equal(sent[k], back[k]) for k in sent)


# --------------------------------------------------------------------------------- the policy, not the run


def test_a_real_site_declines_what_its_policy_forbids_whatever_the_run_config_says(tmp_path, video_dir):
    """σ = 0, clip-only, σ below the site's minimum, more local steps than allowed, the gdp accountant, another
    privacy unit: each declined with its reason, nothing trained, nothing spent."""
    node = _real_site(tmp_path, video_dir)
    attacks = {
        "noise-multiplier 0": {"noise-multiplier": 0.0},
        "clip-only": {"noise-multiplier": 0.0, "clip-only": True},
        "at least 0.5": {"noise-multiplier": 0.3},
        "at most 1000": {"local-steps": 1001},
        "gdp": {"accountant": "gdp"},
        "privacy unit is frame": {"privacy-unit": "segment", "segment-frames": 2},
    }
    for reason, run in attacks.items():
        model = _model()
        reply, _ = _train(run, node, model=model)
        m = reply.content["metrics"]
        assert m["declined"] == 1 and m["steps"] == 0 and m["num-examples"] == 0, reason
        assert reason in reply.content["site"]["note"]
        assert _unchanged(model, reply), reason
    assert not (tmp_path / "state" / LEDGER).exists()  # nothing was ever spent
    # The same site trains a round its policy allows, and only then writes its ledger.
    reply, _ = _train({"local-steps": 2}, node)
    assert reply.content["metrics"]["declined"] == 0
    assert _ledger(tmp_path)["history"][0][0] == RUN["noise-multiplier"]


def test_a_raised_budget_or_a_loose_delta_in_the_run_config_changes_nothing(tmp_path, video_dir):
    node = _real_site(tmp_path, video_dir, **{"max-epsilon": 30})
    first, ctx = _train({"epsilon-budget": 1e9, "delta": 0.9}, node)
    m = first.content["metrics"]
    # δ is the site's (1e-5), not the run's 0.9: ε is computed there and matches an independent accountant.
    assert m["delta"] == 1e-5
    assert m["epsilon"] == pytest.approx(
        independent_epsilon(m["dp_sigma"], m["dp_sample_rate"], m["dp_steps"], 1e-5), rel=1e-9
    )
    assert m["epsilon"] > 0
    # The site's max-epsilon binds although the run asks for a budget of 1e9: the round that would pass
    # 1.05 × the spent ε is declined when the site's own limit is just above what it has spent.
    node["max-epsilon"] = m["epsilon"] * 1.05
    second, _ = _train({"epsilon-budget": 1e9, "delta": 0.9}, node, server_round=2)
    assert second.content["metrics"]["declined"] == 1 and "past its budget" in second.content["site"]["note"]
    assert sum(n for _, _, n in _ledger(tmp_path)["history"]) == RUN["local-steps"]
    # A run config may tighten: a smaller δ gives a larger ε, checked against the budget at that δ.
    tight, _ = _train({"delta": 1e-9}, {**node, "max-epsilon": 1e9}, server_round=3)
    t = tight.content["metrics"]
    history = (t["dp_sigma"], t["dp_sample_rate"], t["dp_steps"])
    assert t["delta"] == 1e-9 and t["epsilon"] == pytest.approx(independent_epsilon(*history, 1e-9), rel=1e-9)
    assert t["epsilon"] > independent_epsilon(*history, 1e-5)


def test_prv_asked_by_the_run_is_only_used_when_it_gives_the_larger_epsilon(tmp_path):
    reply, _ = _train({"accountant": "prv"}, {"accountant": "rdp"})
    m = reply.content["metrics"]
    rdp = independent_epsilon(m["dp_sigma"], m["dp_sample_rate"], m["dp_steps"], m["delta"])
    assert m["epsilon"] >= rdp * (1 - 1e-9)  # the larger of the site's rdp and the run's prv
    assert reply.content["site"]["accountant"] == "rdp,prv"


def test_a_simulated_site_allows_the_sweeps_non_private_references():
    for run in ({"noise-multiplier": 0.0}, {"noise-multiplier": 0.0, "clip-only": True}):
        m = _train(run)[0].content["metrics"]
        assert m["declined"] == 0 and math.isinf(m["epsilon"])


def test_a_real_site_without_state_dir_refuses_to_train(video_dir):
    model = _model()
    reply, _ = _train(node={"video-dir": str(video_dir)}, model=model)
    assert reply.content["metrics"]["declined"] == 1 and "state-dir" in reply.content["site"]["note"]
    assert _unchanged(model, reply)


def test_node_config_policy_errors_are_one_clear_line():
    for node, key in (
        ({"max-epsilon": "lots"}, "max-epsilon"),
        ({"accountant": "gdp"}, "accountant"),
        ({"release": "eval,pixels"}, "release"),
        ({"allow-non-private": "maybe"}, "allow-non-private"),
        ({"privacy-unit": "clip"}, "privacy-unit"),
        ({"max-local-steps": 2.5}, "max-local-steps"),
    ):
        with pytest.raises(FedlvcError, match=key):
            SitePolicy.of(node)
    policy = SitePolicy.of({"release": "none", "video-dir": "/x"})
    assert policy.release == frozenset() and policy.real_video and not policy.allow_non_private


# ------------------------------------------------------------------------------- nothing but the noised model


def _bright_crop_detector(gradient: bool):
    """The operator's crafted model: the first analysis convolution measures how bright each 5×5 patch is
    (channel 0: a·(mean − 0.85)), the next two multiply that by b and c and the last divides it back by 1e38,
    so a patch darker than 0.85 stays a small number while a near-white one overflows float32 on the way:
    its loss is inf (``gradient`` False), or its loss stays finite and its per-sample gradient of the last
    convolution (activation 3.3e38 × back-propagated error) does not (``gradient`` True)."""
    model = _model()
    a_conv, b_conv, c_conv, d_conv = (m for m in model.g_a.layers if isinstance(m, torch.nn.Conv2d))
    scale = (3.3e38 if gradient else 6.8e39) / 0.15  # a·b·c; a white patch reaches a·b·c·0.15
    with torch.no_grad():
        a_conv.weight[0] = scale ** (1 / 3) / a_conv.weight[0].numel()
        a_conv.bias[0] = -(scale ** (1 / 3)) * (0.85 - 0.5)  # g_a sees x − 0.5
        for conv in (b_conv, c_conv):  # channel 0 on its own: scaled by b, then by c
            conv.weight[:, 0] = 0
            conv.weight[0] = 0
            conv.weight[0, 0, 2, 2] = scale ** (1 / 3)
            conv.bias[0] = 0
        d_conv.weight[:, 0] = 0
        d_conv.weight[0, 0, 2, 2] = 1e-38
        if gradient:  # the synthesis reads the bright channel at its centre only: a large error to back-propagate
            s_conv = model.g_s.layers[0]
            s_conv.weight[:, 0] = 0
            s_conv.weight[:, 0, 1, 1] = 1.0
    return model


def _crops_behave(model, frames, gradient: bool) -> None:
    """The crafted model does what the attack needs: every crop of the site's ordinary frames has a finite loss
    and gradient; a white crop has a non-finite loss, or (``gradient``) a finite loss and a non-finite gradient."""
    from common.train.losses import RateDistortion

    loss_fn, model = RateDistortion(model.cfg.lambdas), model.train()
    gen = torch.Generator().manual_seed(0)
    ordinary = [
        torch.from_numpy(f[y : y + 32, x : x + 32].copy()) for f in frames for y in (0, 16) for x in (0, 16, 32)
    ]
    for i, crop in enumerate([*ordinary, torch.full((32, 32, 3), 255, dtype=torch.uint8)]):
        x = crop.permute(2, 0, 1)[None].float() / 255
        levels = torch.randint(0, model.cfg.num_levels, (1,), generator=gen)
        model.zero_grad()
        loss = loss_fn(model(x, levels), x, levels)
        loss.sum().backward()
        grads = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        if i < len(ordinary):
            assert torch.isfinite(loss).all() and grads
        else:
            assert bool(torch.isfinite(loss).all()) == gradient and not grads
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("gradient", [False, True], ids=["loss-overflows", "gradient-overflows"])
def test_a_crafted_model_cannot_tell_a_site_with_one_bright_frame_from_one_without(tmp_path, gradient):
    """Issue 33: a model whose loss (or per-sample gradient) overflows only on near-white crops, σ = 6, a batch
    of at least the site's frames (q = 1: the bright frame is in every batch), 20 local steps, sent to two real
    sites at their default policy that differ by one frame (white at one, ordinary at the other). Under DP the
    replies may differ only by the noised model: no error, the same metrics and notes, finite arrays."""
    clip = list(generate_site_clip(5, 0, 64, 48, 8))
    replies, sent = [], {}
    for name, first in (("without", clip[0]), ("with", np.full_like(clip[0], 255))):
        folder = tmp_path / name / "videos"
        folder.mkdir(parents=True)
        write_video(folder / "cam.mkv", [first, *clip[1:]], Fraction(25))
        node = {"video-dir": str(folder), "state-dir": str(tmp_path / name / "state")}
        run = {"noise-multiplier": 6.0, "batch-size": 16, "local-steps": 20}
        run["train-parts"] = "all" if gradient else "entropy"  # (entropy: the detector itself never moves)
        model = _bright_crop_detector(gradient)
        if not sent:
            _crops_behave(model, clip, gradient)
        sent = model.state_dict()
        try:
            replies.append(_train(run, node, model=model)[0])
        except FedlvcError as e:  # the old site: "training diverged" reached the server
            pytest.fail(f"the site {name} a bright frame answered with an error: {e}")
    without, with_ = (r.content for r in replies)
    assert dict(without["metrics"]) == dict(with_["metrics"])  # ε, steps, units, declined: all the same
    assert without["metrics"]["declined"] == 0 and without["metrics"]["epsilon"] < 10
    assert dict(without["site"]) == dict(with_["site"])
    for content in (without, with_):
        arrays = content["arrays"].to_torch_state_dict()
        assert all(torch.isfinite(v).all() for v in arrays.values())
        assert any(not torch.equal(arrays[k], sent[k]) for k in sent)  # trained and noised, not sent back


# ------------------------------------------------------------------------------------------ noise nobody replays


def test_two_runs_with_the_same_seed_and_messages_draw_different_noise_but_the_same_crops():
    from common.data.clips import FrameCrops
    from common.train.privacy import DPConfig
    from common.train.training import local_train

    frames = [f for f in generate_site_clip(3, 0, 64, 48, 10)]

    def run(dp):
        model = _model(1)
        rc = RunConfig.from_mapping({"local-steps": 2, "batch-size": 4, "crop-size": 32, "learning-rate": 1e-3})
        local_train(model, frames, rc, dp, seed=7)
        return model.state_dict()

    dp = DPConfig(1.0, 1.0)
    a, b = run(dp), run(dp)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the same seed, different noise and batches
    plain_a, plain_b = run(None), run(None)
    assert all(torch.equal(plain_a[k], plain_b[k]) for k in plain_a)  # without DP the seed reproduces the run
    crops_a, crops_b = FrameCrops(frames, 32, 6, seed=7), FrameCrops(frames, 32, 6, seed=7)
    for i in (0, 3, 3, 9):  # the crops are reproducible from the seed
        (xa, la), (xb, lb) = crops_a[i], crops_b[i]
        assert torch.equal(xa, xb) and la == lb


def test_dp_noise_does_not_come_from_torchs_default_generator():
    from common.train.privacy import secure_generator

    draws = []
    for _ in range(2):
        torch.manual_seed(0)
        draws.append(torch.randn(4, generator=secure_generator()))
    assert not torch.equal(draws[0], draws[1])


# ----------------------------------------------------------------------------------------- a ledger that grows


@pytest.mark.parametrize(
    "record",
    [
        {"site_0": {"unit_frames": 1, "history": [[1.0, 0.25, -5]]}},  # negative steps
        {"site_0": {"unit_frames": 1, "history": [[float("nan"), 0.25, 3]]}},  # NaN σ (hung the accountant)
        {"site_0": {"unit_frames": 1, "history": [[1.0, 1.5, 3]]}},  # q > 1
        {"site_0": {"unit_frames": 1, "history": [[-1.0, 0.25, 3]]}},  # negative σ
        {"site_0": {"unit_frames": 1, "history": [[1.0, 0.25, 2.5]]}},  # fractional steps
        {"site_0": {"unit_frames": 1, "history": [[1.0, 0.25, 3]] * 10_001}},  # too many entries
    ],
)
def test_a_forged_earlier_ledgers_record_is_refused(record):
    msg = _message(_model(), "train")
    msg.content["config"]["earlier-ledgers"] = json.dumps(record)
    with pytest.raises(FedlvcError, match="earlier-ledgers record is malformed"):
        client_app.train(msg, _context())


def test_a_site_with_state_dir_never_takes_its_spending_from_the_server(tmp_path):
    """An empty record cannot restart a site at ε 0, and a fresh state-dir does not adopt a server record."""
    node = {"state-dir": str(tmp_path / "state")}
    forged = json.dumps({"site_0": {"unit_frames": 1, "history": [[50.0, 0.001, 1]]}})
    for record in (forged, "{}"):
        msg = _message(_model(), "train")
        msg.content["config"]["earlier-ledgers"] = record
        client_app.train(msg, _context(node=node))
    history = _ledger(tmp_path)["history"]
    assert all(s == RUN["noise-multiplier"] for s, _, _ in history)  # only what the site itself spent
    assert sum(n for _, _, n in history) == 2 * RUN["local-steps"]  # "{}" did not reset it


def test_a_deleted_emptied_or_rolled_back_ledger_is_an_error_not_a_fresh_start(tmp_path):
    node = {"state-dir": str(tmp_path / "state")}
    _train(node=node)
    ledger, seal = tmp_path / "state" / LEDGER, tmp_path / "state" / SEAL
    first = ledger.read_text()
    _train(node=node, server_round=2)
    second = ledger.read_text()
    cases = {
        "missing": lambda: ledger.unlink(),
        "damaged": lambda: ledger.write_text(""),
        "older than its seal": lambda: ledger.write_text(first),
    }
    for message, damage in cases.items():
        damage()
        with pytest.raises(FedlvcError, match=message):
            _train(node=node, server_round=3)
        ledger.write_text(second)
    assert _train(node=node, server_round=3)[0].content["metrics"]["declined"] == 0  # restored: it goes on
    assert json.loads(seal.read_text())["steps"] == 3 * RUN["local-steps"]
    # Only deleting both ledger and seal starts a new site (documented: keep state-dir backed up).
    ledger.unlink()
    seal.unlink()
    assert sum(_train(node=node)[0].content["metrics"]["dp_steps"]) == RUN["local-steps"]


def test_two_runs_on_one_state_dir_serialise_their_spending(tmp_path, monkeypatch):
    """While another run holds the ledger's lock and spends, a training round waits for it and then adds to
    what the other run spent (it neither overwrites it nor checks its budget against a stale ledger). The other
    run writes only once the round has found the lock held, so the round cannot have read the ledger before."""
    state = tmp_path / "state"
    node = {"state-dir": str(state)}
    _train(node=node)  # the ledger exists: one round spent
    result, tried, flock = {}, threading.Event(), fcntl.flock

    def watched_flock(fd, operation):  # the second run's lock: tried without waiting first, then waited for
        if threading.current_thread().name == "second-run" and operation == fcntl.LOCK_EX and not tried.is_set():
            try:
                flock(fd, operation | fcntl.LOCK_NB)
            except BlockingIOError:
                tried.set()  # the other run holds it: wait for it below
            else:
                result["lock was free"] = True
                tried.set()
                return None
        return flock(fd, operation)

    def second_run():
        try:
            result["reply"] = _train(node=node, server_round=1)[0]
        finally:
            tried.set()  # a round that failed before the lock fails the test below, not after a wait

    monkeypatch.setattr(fcntl, "flock", watched_flock)
    thread = threading.Thread(target=second_run, name="second-run")
    with _exclusive(state / LOCK):  # the other run: reads, spends, writes while it holds the lock
        thread.start()
        assert tried.wait(timeout=300) and "lock was free" not in result  # the round waits for the lock now
        other = PrivacyLedger._read(state, 1)
        other.spend(7.0, 0.5, 5)
        other.save(None, "rdp", 1e-5)
    thread.join(timeout=300)  # a bound on a stuck round, not a guess at how long one takes
    assert not thread.is_alive()
    history = _ledger(tmp_path)["history"]
    assert [7.0, 0.5, 5] in history  # the other run's spending survived
    assert sum(n for _, _, n in history) == 2 * RUN["local-steps"] + 5
    assert [7.0, 0.5, 5] in [
        list(h)
        for h in zip(*(result["reply"].content["metrics"][k] for k in ("dp_sigma", "dp_sample_rate", "dp_steps")))
    ]


# ------------------------------------------------------------------------------ a ledger sealed with a key


def _read_ledger(state: Path) -> None:
    with open_ledger(_context(node={"state-dir": str(state)}), RunConfig.from_mapping(RUN)):
        pass


def test_an_edited_sigma_is_an_error_and_the_round_the_true_ledger_declines_trains_nothing(tmp_path, monkeypatch):
    """Issue 33, hole 5: σ of one entry edited from 1.0 to 100 on disk no longer lets a round through."""
    state = tmp_path / "state"
    node = {"state-dir": str(state)}
    spent = _train(node=node)[0].content["metrics"]["epsilon"]
    node["max-epsilon"] = spent * 1.05  # the true ledger declines a second round
    assert _train(node=node, server_round=2)[0].content["metrics"]["declined"] == 1
    doc = _ledger(tmp_path)
    assert doc["history"][0][0] == 1.0
    doc["history"][0][0] = 100.0
    (state / LEDGER).write_text(json.dumps(doc, indent=1))
    edited = {name: (state / name).read_bytes() for name in (LEDGER, SEAL)}
    monkeypatch.setattr(client_app, "_train_round", lambda *a: pytest.fail("the site trained"))
    with pytest.raises(FedlvcError, match=f"{LEDGER} does not match its seal key"):
        _train(node=node, server_round=3)
    assert {name: (state / name).read_bytes() for name in (LEDGER, SEAL)} == edited  # nothing booked


def test_any_single_byte_edit_of_the_ledger_or_its_seal_is_an_error(tmp_path):
    """Every byte of both files, changed to its neighbours and to whitespace (which keeps the JSON content the
    same where the byte was whitespace): each edit is refused, naming the file."""
    state = tmp_path / "state"
    _train(node={"state-dir": str(state)})
    _train(node={"state-dir": str(state)}, server_round=2)
    for name in (LEDGER, SEAL):
        path = state / name
        original = path.read_bytes()
        for i, byte in enumerate(original):
            for other in {byte ^ 1, byte ^ 2, ord(" "), ord("\n"), ord("\r")} - {byte}:
                path.write_bytes(original[:i] + bytes([other]) + original[i + 1 :])
                with pytest.raises(FedlvcError, match=name):
                    _read_ledger(state)
        path.write_bytes(original)
    _read_ledger(state)  # restored: accepted


def test_the_key_is_private_made_once_and_a_ledger_without_it_is_an_error(tmp_path):
    state = tmp_path / "state"
    node = {"state-dir": str(state)}
    umask = os.umask(0)  # not world-readable whatever the site's umask
    try:
        _train(node=node)
    finally:
        os.umask(umask)
    key = state / KEY
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    made = key.read_bytes(), key.stat().st_ino
    _train(node=node, server_round=2)
    assert (key.read_bytes(), key.stat().st_ino) == made  # never rewritten
    key.chmod(0o644)
    with pytest.raises(FedlvcError, match=f"{KEY} must be private"):
        _read_ledger(state)
    key.chmod(0o600)
    key.unlink()
    with pytest.raises(FedlvcError, match=f"{KEY} is missing"):
        _train(node=node, server_round=3)


def test_another_sites_ledger_is_refused_without_its_key(tmp_path):
    """A ledger and seal copied from another state-dir (written with another key) are refused."""
    mine, other = tmp_path / "mine", tmp_path / "other"
    for state in (mine, other):
        _train(node={"state-dir": str(state)})
    _train(node={"state-dir": str(other)}, server_round=2)
    for name in (LEDGER, SEAL):
        (mine / name).write_bytes((other / name).read_bytes())
    with pytest.raises(FedlvcError, match="does not match its seal key"):
        _read_ledger(mine)


def test_a_ledger_written_before_seals_is_refused_until_the_site_seals_it_once(tmp_path, capsys):
    """A ledger of format 2 (no key, no mac) is never sealed silently (deleting the key must not turn an edited
    ledger into a fresh seal): the site is told to check it and run ``fedlvc seal-ledger`` once."""
    from client.cli import main as cli

    state = tmp_path / "state"
    state.mkdir()
    history = [[1.0, 0.25, 3], [2.0, 0.25, 4]]
    old = {"format": 2, "accountant": "rdp", "delta": 1e-5, "unit_frames": 1, "sequence": 2, "steps": 7}
    (state / LEDGER).write_text(json.dumps({**old, "releases": {"eval": 1}, "history": history}, indent=1))
    (state / SEAL).write_text(json.dumps({"sequence": 2, "steps": 7}))
    with pytest.raises(FedlvcError, match=f"{LEDGER} was written before ledgers were sealed.*seal-ledger"):
        _train(node={"state-dir": str(state)})
    assert cli(["seal-ledger", str(state)]) == 0
    assert "2 entries, 7 DP steps" in capsys.readouterr().out
    assert _ledger(tmp_path)["releases"] == {"eval": 1} and (state / KEY).exists()
    m = _train(node={"state-dir": str(state)})[0].content["metrics"]
    assert m["declined"] == 0 and m["dp_steps"][:2] == [3, 4] and sum(m["dp_steps"]) == 7 + RUN["local-steps"]
    doc = _ledger(tmp_path)
    del doc["mac"]
    (state / LEDGER).write_text(json.dumps(doc, indent=1))  # unsealed again while the key exists: an edit
    with pytest.raises(FedlvcError, match="does not match its seal key"):
        _read_ledger(state)


# ---------------------------------------------------------------------------- releases are the site's choice


def test_release_eval_answers_one_evaluation_a_round_and_nothing_else(tmp_path, video_dir):
    node = _real_site(tmp_path, video_dir, **{"out-dir": str(tmp_path / "site-out")})  # release = eval (default)
    ctx = _context({"local-steps": 2}, node)
    model = _model()
    before = client_app.evaluate(_message(model, "evaluate"), ctx)  # before the site was asked to train
    assert before.content["metrics"]["refused"] == 1 and "latest training round" in before.content["site"]["note"]
    reply = client_app.train(_message(model, "train", 1), ctx)
    assert "train_loss" not in reply.content["metrics"]  # train-loss is not released
    first = client_app.evaluate(_message(model, "evaluate", 1), ctx).content["metrics"]
    assert "psnr" in first and "refused" not in first
    again = client_app.evaluate(_message(_model(9), "evaluate", 1), ctx)
    assert again.content["metrics"]["refused"] == 1 and "answered already" in again.content["site"]["note"]
    assert set(again.content["metrics"].keys()) == {"refused"}  # nothing computed on private frames
    other = client_app.evaluate(_message(model, "evaluate", 2), ctx)  # a round the site never trained
    assert other.content["metrics"]["refused"] == 1
    rd = client_app.rd(_rd_message(model, _model(4)), ctx)
    assert rd.content["metrics"]["refused"] == 1 and "does not release rd" in rd.content["site"]["note"]
    summary = client_app.compress(_message(model, "query.compress", 1), ctx)
    assert set(summary.content["metrics"].keys()) == {"compressed"}  # the site compressed, said nothing
    assert len(list((tmp_path / "site-out").glob("*.lvc"))) == 2
    assert _ledger(tmp_path)["releases"] == {"eval": 1}  # counted on the site's disk, over all runs


def _answered(ctx, kind: str, server_round: int) -> bool:
    model = _model()
    if kind == "rd":
        reply = client_app.rd(_rd_message(model, model, server_round), ctx)
    else:
        reply = getattr(client_app, kind)(_message(model, f"query.{kind}", server_round), ctx)
    return "refused" not in reply.content["metrics"]


def test_only_a_round_the_site_trained_in_unlocks_one_release_of_each_kind(tmp_path, monkeypatch):
    """Issue 33: a made-up training round that the site does not train in (a broken model config, a round it
    declines) unlocked one more evaluation, rd and compression each. Only a round the site trained in unlocks
    them: one of each, for that round or a later one the server asks about (the final queries' round). A site
    that trained in no round of the run still compresses its own video once, releasing nothing about it."""
    monkeypatch.chdir(tmp_path)  # the simulated site's compressed clips go under runs/sites
    ctx = _context({"local-steps": 2})
    broken = _message(_model(), "train", 1)
    broken.content["config"]["model-config"] = "{not json"
    with pytest.raises(FedlvcError, match="model-config"):
        client_app.train(broken, ctx)
    assert not any(_answered(ctx, kind, 1) for kind in ("evaluate", "rd"))
    untrained = client_app.compress(_message(_model(), "query.compress", 1), ctx).content["metrics"]
    assert set(untrained.keys()) == {"compressed"}  # the run's one compression without a trained round: no release
    first = client_app.train(_message(_model(), "train", 2), ctx).content["metrics"]
    assert first["declined"] == 0 and _answered(ctx, "evaluate", 2)
    ctx.node_config["max-epsilon"] = first["epsilon"] * 1.01  # the site's budget allows no further round
    for server_round in (3, 4):  # declined rounds: nothing more to answer
        assert client_app.train(_message(_model(), "train", server_round), ctx).content["metrics"]["declined"] == 1
        assert not _answered(ctx, "evaluate", server_round)
    assert not _answered(ctx, "rd", 1)  # before the round it trained in
    assert _answered(ctx, "rd", 4) and _answered(ctx, "compress", 4)  # the final queries, once
    assert not any(_answered(ctx, kind, 4) for kind in ("evaluate", "rd", "compress"))
    fresh = _context({"epsilon-budget": 1e-3})  # a run whose every round the site declines
    for server_round in (1, 2, 3):
        assert client_app.train(_message(_model(), "train", server_round), fresh).content["metrics"]["declined"] == 1
        assert not any(_answered(fresh, kind, server_round) for kind in ("evaluate", "rd"))
    # it still compresses its own video once in the run (what it joined for), releasing nothing about it
    once = client_app.compress(_message(_model(), "query.compress", 3), fresh).content
    assert set(once["metrics"].keys()) == {"compressed"} and "trained in no round" in once["site"]["note"]
    assert not _answered(fresh, "compress", 3) and not _answered(fresh, "compress", 4)


@pytest.mark.parametrize("run_out", ["/tmp/fedlvc-hostile-{}", "../../fedlvc-hostile-{}"])
def test_the_final_compression_never_writes_where_the_run_config_says(tmp_path, monkeypatch, run_out):
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")
    target = Path(run_out.format(tmp_path.name)).resolve()
    for node, where in (
        ({"state-dir": str(tmp_path / "state")}, tmp_path / "state" / "out"),
        ({}, tmp_path / "a" / "b" / "runs" / "sites" / "site_0"),
    ):
        ctx = _context({"out-dir": run_out.format(tmp_path.name)}, node)
        model = _model()
        client_app.train(_message(model, "train", 1), ctx)
        client_app.compress(_message(model, "query.compress", 1), ctx)
        assert len(list(where.glob("*.lvc"))) == RUN["demo-clips"]
        assert not target.exists()


# ---------------------------------------------------------------------------------- bounds on what is allocated


def test_a_model_config_with_a_million_channels_is_refused_before_anything_is_allocated():
    msg = _message(_model(), "train")
    cfg = json.loads(msg.content["config"]["model-config"])
    for key, value in (
        ("channels", 10**6),
        ("latent_channels", 10**6),
        ("mixtures", 10**4),
        ("support", 10**7),
        ("lambdas", [0.01] * 1000),
        ("channels", "64"),
        ("stride", 2),
    ):
        msg.content["config"]["model-config"] = json.dumps({**cfg, key: value})
        with pytest.raises(FedlvcError, match="model config"):
            client_app.train(msg, _context())
    # Within the config's limits, yet more than the site's memory: refused by the site before building it.
    msg.content["config"]["model-config"] = json.dumps({**cfg, "channels": 512, "latent_channels": 512})
    with pytest.raises(FedlvcError, match="max-memory-mb"):
        client_app.train(msg, _context(node={"max-memory-mb": 100}))


def test_run_config_sizes_are_bounded_and_the_site_checks_its_memory_first():
    for key, value in (
        ("site-max-frames", 10**7),
        ("crop-size", 4096),
        ("batch-size", 10**6),
        ("demo-frames", 10**7),
        ("demo-width", 10**5),
        ("demo-clips", 10**5),
        ("local-steps", 10**9),
    ):
        with pytest.raises(FedlvcError, match=key):
            RunConfig.from_mapping({key: value})
    big = {"demo-frames": 100_000, "demo-width": 4096, "demo-height": 4096, "demo-clips": 1000}  # each in bounds
    with allocates_at_most(64 << 20):  # refused from the sizes: 5 PB of frames were never generated
        with pytest.raises(FedlvcError, match="holding the site's frames"):
            client_app.train(_message(_model(), "train"), _context(big))
    with pytest.raises(FedlvcError, match="a training step"):
        client_app.train(_message(_model(), "train"), _context({"batch-size": 4096, "crop-size": 512}))


def _wide(msg):
    """``msg`` naming a 512-channel model in its model-config (its arrays stay the tiny model's: never built)."""
    cfg = json.loads(msg.content["config"]["model-config"])
    msg.content["config"]["model-config"] = json.dumps({**cfg, "channels": 512})
    return msg


def test_max_memory_mb_guards_evaluation_rd_and_compression_too(tmp_path, monkeypatch, video_dir):
    """Issue 33: evaluation, query.rd and the final compression ran past max-memory-mb (a 512-channel model on a
    1280×720 site grew the process by 934 MB against 800). Each estimates what coding the site's frames with the
    message's model would hold and refuses with the reason before the model is built; a small model on a small
    site still gets its answers."""
    folder = tmp_path / "hd"
    folder.mkdir()
    write_video(folder / "cam.mkv", generate_site_clip(5, 0, 1280, 720, 4), Fraction(25))
    node_policy = {"max-memory-mb": 800, "release": "eval,rd,compress-summary"}
    node = _real_site(tmp_path, folder, **node_policy)
    ctx = _context({"site-max-frames": 4, "local-steps": 1}, node)
    assert _train(ctx=ctx)[0].content["metrics"]["declined"] == 0  # a round trained: each query may be answered

    def never(*args, **kwargs):
        raise AssertionError("the model was built: the estimate came too late")

    monkeypatch.setattr(client_app, "_model_from", never)
    for reply in (
        client_app.evaluate(_wide(_message(_model(), "evaluate", 1)), ctx),
        client_app.rd(_wide(_rd_message(_model(), _model(), 1)), ctx),
        client_app.compress(_wide(_message(_model(), "query.compress", 1)), ctx),
    ):
        assert reply.content["metrics"]["refused"] == 1
        assert "max-memory-mb" in reply.content["site"]["note"] and "800 MB" in reply.content["site"]["note"]
    monkeypatch.undo()
    small = _context({"local-steps": 1}, _real_site(tmp_path / "small", video_dir, **node_policy))
    _train(ctx=small)
    for kind in ("evaluate", "rd", "compress"):
        assert _answered(small, kind, 1)


def test_a_site_trains_no_personal_model_past_its_memory(tmp_path, monkeypatch, video_dir):
    """The final model may be wider than the ones the rounds trained: a personal model that fine-tuning would
    need more than max-memory-mb for is not trained; the site measures (and codes with) the final model and
    says why."""
    monkeypatch.chdir(tmp_path)
    run = {"local-steps": 1, "batch-size": 16, "crop-size": 64, "personal-steps": 2}
    ctx = _context(run, _real_site(tmp_path, video_dir, **{"max-memory-mb": 300, "release": "rd"}))
    _train(ctx=ctx)  # the tiny model's training fits
    torch.manual_seed(0)
    wide = FedlvcCodec(CodecConfig(channels=128))  # coding it fits, fine-tuning it would not
    reply = client_app.rd(_rd_message(wide, wide), ctx)
    note = reply.content["site"]["note"]
    assert "no personal model: training the personal model would need" in note and "max-memory-mb" in note
    assert "bpp-federated" in reply.content["metrics"] and "bpp-personal" not in reply.content["metrics"]


def test_a_message_whose_arrays_do_not_fit_its_model_config_is_one_clear_error():
    msg = _message(_model(), "train")
    msg.content["config"]["model-config"] = json.dumps(
        {**json.loads(msg.content["config"]["model-config"]), "channels": 16}
    )
    with pytest.raises(FedlvcError, match="do not fit its model-config"):
        client_app.train(msg, _context())


def test_no_history_can_hang_the_accountant_and_a_bounded_epsilon_is_never_smaller():
    """Opacus' RDP analysis costs ~0.15 s per distinct (σ, q) and grows with σ, its PRV accountant runs out of
    memory at 10^6 steps: ε is computed from at most 32 settings (σ rounded down, q up beyond that) and a
    long history's PRV ε is its RDP ε. Both only raise ε."""
    import random

    from common.train.privacy import bounded_history, checked_history, epsilon_from_history

    rng = random.Random(0)
    history = [(rng.uniform(0.5, 3), rng.uniform(0.01, 0.5), rng.randint(1, 50)) for _ in range(36)]
    assert len(bounded_history(history)) <= 32
    assert epsilon_from_history(history, 1e-5) >= independent_epsilon(*zip(*history), 1e-5)
    few = history[:3] + history[:2]  # equal settings merge exactly
    assert epsilon_from_history(few, 1e-5) == pytest.approx(independent_epsilon(*zip(*few), 1e-5), rel=1e-9)
    extreme = checked_history(
        [(10 ** rng.uniform(-300, 6), 10 ** rng.uniform(-300, 0), 10**9) for _ in range(10_000)], "a forged record"
    )
    assert all(epsilon_from_history(extreme, 1e-5, a) > 0 for a in ("rdp", "prv"))  # returns (inf), not hangs
    long = [(1.0, 0.05, 10**6)]
    assert epsilon_from_history(long, 1e-5, "prv") == epsilon_from_history(long, 1e-5, "rdp")
