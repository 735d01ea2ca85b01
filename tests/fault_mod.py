"""Test-only fault injection: a Flower mod that makes a chosen site crash or stall in a chosen training round,
and the ClientApp and app folder that carry it into a Flower run. Production code knows nothing of it.

A test that needs faults in a real ``flwr run`` calls :func:`app_with_faults`: a copy of the app folder whose
``clientapp`` component is ``tests.fault_app:app`` (client.app's handlers, with the mod inside the train
handler's own mods) and whose ``tests/fault_plan.json`` says which faults. Flower bundles both files into the
app's FAB (``**/*.py``, ``**/*.json``; only ``test_*.py`` is left out). In-process tests use :func:`faulty_app`."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import tomllib
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client import app as production
from client.secure import train_config
from client.site import site_identity

REPO = Path(__file__).resolve().parent.parent
PLAN_FILE = "fault_plan.json"
FAULT_APP = "tests.fault_app:app"
HANG_LIMIT_S = 3600.0  # a hang whose release never comes ends here: a stuck worker must not outlive the run


@dataclasses.dataclass(frozen=True)
class Fault:
    """Site ``site`` (its number: partition-id) in training round ``round``: raises (``crash``), or stalls until
    the file ``until`` exists (``hang``), then trains as usual."""

    site: int
    round: int
    action: str = "crash"
    until: str = ""

    def __post_init__(self):
        if self.action not in ("crash", "hang") or (self.action == "hang") != bool(self.until):
            raise ValueError(f"a fault crashes, or hangs until a file exists: {self}")

    def strike(self) -> None:
        if self.action == "crash":
            raise RuntimeError(f"fault injected by tests/fault_mod.py: site {self.site} crashes in round {self.round}")
        release, deadline = Path(self.until), time.monotonic() + HANG_LIMIT_S
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.2)  # a poll for the release, not a guess at how long anything takes


def fault_mod(faults: list[Fault]):
    """A mod striking each of ``faults`` when the train handler gets its site's message of its round."""

    def mod(msg: Message, context: Context, call_next) -> Message:
        _, number = site_identity(context.node_config, context.node_id)
        try:
            server_round = int(train_config(msg.content).get("server-round", 0))
        except (TypeError, ValueError):
            server_round = 0  # the handler itself refuses such a message
        for fault in faults:
            if (fault.site, fault.round) == (number, server_round):
                fault.strike()
        return call_next(msg, context)

    return mod


def faulty_app(faults: list[Fault]) -> ClientApp:
    """client.app's handlers, the fault mod innermost on train: it sees what ``train`` sees (under SecAgg+, the
    stage in which the site trains and masks its update)."""
    app = ClientApp()
    app.train(mods=[*production.TRAIN_MODS, fault_mod(faults)])(production.train)
    app.evaluate()(production.evaluate)
    app.query("compress")(production.compress)
    app.query("rd")(production.rd)
    return app


def read_plan(path: Path) -> list[Fault]:
    return [Fault(**f) for f in json.loads(path.read_text())]


def app_with_faults(folder: Path, faults: list[Fault]) -> Path:
    """A copy of the app in ``folder`` (a valid Flower app name) that runs ``faults``: its packages and the two
    files of this fault injection, its pyproject naming the test ClientApp."""
    pyproject = (REPO / "pyproject.toml").read_text()
    packages = {p.split(".")[0] for p in tomllib.loads(pyproject)["tool"]["setuptools"]["packages"]}
    skip = shutil.ignore_patterns("__pycache__", "*.safetensors", "*.log")  # Flower bundles no weights or logs
    for package in sorted(packages):
        shutil.copytree(REPO / package, folder / package, ignore=skip)
    (folder / "tests").mkdir()
    for name in ("fault_mod.py", "fault_app.py"):
        shutil.copy(REPO / "tests" / name, folder / "tests" / name)
    (folder / "tests" / PLAN_FILE).write_text(json.dumps([dataclasses.asdict(f) for f in faults]))
    component = 'clientapp = "client.app:app"'
    assert pyproject.count(component) == 1, f"pyproject.toml names no {component}"
    (folder / "pyproject.toml").write_text(pyproject.replace(component, f'clientapp = "{FAULT_APP}"'))
    return folder
