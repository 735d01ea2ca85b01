"""Fault injection is test-only (tests/fault_mod.py): the mod strikes the site and round it is told, a run's app
bundle carries it when a test asks, and the production ClientApp reads no test hook."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import tomllib
import zipfile

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client import app as client_app
from tests.fault_mod import FAULT_APP, PLAN_FILE, REPO, Fault, app_with_faults, fault_mod, faulty_app
from tests.test_federation import _context, _message, _model

pytestmark = pytest.mark.usefixtures("flower_task_identity")  # tests/conftest.py


def _ask(server_round: int) -> Message:
    config = ConfigRecord({"server-round": server_round})
    return Message(RecordDict({"config": config}), dst_node_id=1, message_type="train")


def _site(number: int) -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": number}, state=RecordDict(), run_config={})


def _trains(msg, context):
    return "trained"


def test_the_fault_mod_crashes_its_site_in_its_round_only():
    mod = fault_mod([Fault(site=1, round=2)])
    with pytest.raises(RuntimeError, match="fault injected"):
        mod(_ask(2), _site(1), _trains)
    assert mod(_ask(1), _site(1), _trains) == mod(_ask(2), _site(0), _trains) == "trained"


def test_a_hang_lasts_until_its_release_file_exists(tmp_path, monkeypatch):
    """The stalled site polls for its release (no fixed stall): here the file appears at the third poll."""
    release, polls = tmp_path / "release", []

    def poll(seconds):
        polls.append(seconds)
        if len(polls) == 3:
            release.touch()

    monkeypatch.setattr(time, "sleep", poll)
    mod = fault_mod([Fault(site=0, round=1, action="hang", until=str(release))])
    assert mod(_ask(1), _site(0), _trains) == "trained" and len(polls) == 3
    with pytest.raises(ValueError, match="hangs until a file exists"):
        Fault(site=0, round=1, action="hang")


def test_the_production_client_app_reads_no_fault_environment(monkeypatch):
    """The environment variables that once injected faults into client.app do nothing now."""
    monkeypatch.setenv("FEDLVC_INJECT_FAULT", "0:1")
    monkeypatch.setenv("FEDLVC_INJECT_HANG", "0:1:3600")
    assert client_app.train(_message(_model(), "train", 1), _context()).content["metrics"]["declined"] == 0


def test_the_fault_app_registers_every_handler_of_the_production_app():
    assert set(faulty_app([])._registered_funcs) == set(client_app.app._registered_funcs)  # Flower's registry


LOAD_FROM_FAB = """
import json, sys, zipfile
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.config import get_metadata_from_config, get_project_config
from flwr.supercore.task_identity import TaskIdentity
TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
fab, folder = sys.argv[1:]
zipfile.ZipFile(fab).extractall(folder)
app = get_load_client_app_fn("", folder, multi_app=True)(*get_metadata_from_config(get_project_config(folder)), "")
ask = Message(RecordDict({"config": ConfigRecord({"server-round": 2})}), dst_node_id=1, message_type="train")
try:
    app(ask, Context(run_id=1, node_id=7, node_config={"partition-id": 1}, state=RecordDict(), run_config={}))
    error = ""
except RuntimeError as e:
    error = str(e)
import client.app, tests.fault_mod
print(json.dumps({"error": error, "modules": [client.app.__file__, tests.fault_mod.__file__]}))
"""


def test_the_app_bundle_of_a_faulty_run_carries_the_mod_and_flower_loads_it(tmp_path):
    """The FAB Flower builds from app_with_faults' folder holds the mod, the test ClientApp and the plan, names
    that ClientApp, and the app Flower loads from it (as a simulation or SuperNode does) crashes where told."""
    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(app_with_faults(tmp_path / "fedlvc-faults", [Fault(site=1, round=2)]))
    with zipfile.ZipFile(io.BytesIO(fab)) as bundle:
        names = set(bundle.namelist())
        config = tomllib.loads(bundle.read("pyproject.toml").decode())
    assert {"tests/fault_mod.py", "tests/fault_app.py", f"tests/{PLAN_FILE}", "client/app.py"} <= names
    assert config["tool"]["flwr"]["app"]["components"]["clientapp"] == FAULT_APP
    (tmp_path / "run.fab").write_bytes(fab)
    unpacked = tmp_path / "unpacked"
    args = [sys.executable, "-c", LOAD_FROM_FAB, str(tmp_path / "run.fab"), str(unpacked)]
    out = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert "fault injected" in loaded["error"]
    assert all(module.startswith(str(unpacked)) for module in loaded["modules"])  # the bundle's code, not ours
    production = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]
    assert production["clientapp"] == "client.app:app"  # a plain run loads the production ClientApp
