"""A Flower simulation runtime we own: a ``flower-superlink --simulation`` on a free loopback port with its own
FLWR_HOME, runs submitted with ``flwr run`` and judged by ``flwr list --format json`` (``flwr run --stream``
exits 0 even when a run fails), and the SuperLink stopped by PID at the end. Used by the sweep, the
benchmarks and the end-to-end tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent.parent


def flwr_bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flwr_env(home: Path) -> dict:
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
    )
    return env


def flwr_json(args: list[str], cwd, home: Path, key: str) -> list[dict]:
    """The ``key`` list of ``flwr ARGS --format json`` (Flower may print log lines before the JSON)."""
    cmd = [flwr_bin("flwr"), *args, "--format", "json"]
    out = subprocess.run(cmd, cwd=cwd, env=flwr_env(home), capture_output=True, text=True, timeout=120)
    text = out.stdout
    return json.loads(text[text.index("{") :]).get(key, []) if "{" in text else []


def latest_run(runs: list[dict]) -> dict:
    """The run submitted last, {} when there is none."""
    return max(runs, key=lambda r: r.get("pending-at", "")) if runs else {}


def wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


class SimulationRuntime:
    """``with SimulationRuntime(workdir) as rt: rt.run(run_config, num_supernodes)``."""

    def __init__(self, workdir: str | os.PathLike, port: int | None = None):
        self.workdir = Path(workdir)
        self.home = self.workdir / "flwr-home"
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> SimulationRuntime:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        self.process = subprocess.Popen(
            [
                flwr_bin("flower-superlink"),
                "--insecure",
                "--simulation",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--disable-runtime-dependency-installation",
            ],
            cwd=self.workdir,
            env=flwr_env(self.home),
            stdout=open(self.workdir / "superlink.log", "a"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_port(self.port)
        return self

    def run(
        self,
        run_config: str,
        num_supernodes: int,
        cpus_per_site: int = 1,
        timeout: float = 3600,
        log: Path | None = None,
        app: Path = APP_DIR,
    ) -> dict:
        """Submit one run of the app (the one in ``app``: this repository's unless told) and wait for it; returns
        {"run_id", "status", "output"}."""
        before = {r["run-id"] for r in self.list_runs()}
        proc = subprocess.run(
            [
                flwr_bin("flwr"),
                "run",
                str(app),
                "sim",
                "--stream",
                "--run-config",
                run_config,
                "--federation-config",
                f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_site}",
            ],
            cwd=self.workdir,
            env=flwr_env(self.home),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        output = proc.stdout + proc.stderr
        if log is not None:
            log.write_text(output)
        run = latest_run([r for r in self.list_runs() if r["run-id"] not in before])
        return {"run_id": run.get("run-id"), "status": run.get("status"), "output": output}

    def list_runs(self) -> list[dict]:
        return flwr_json(["list", "sim"], self.workdir, self.home, "runs")

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
