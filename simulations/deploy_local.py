"""Run fedlvc as a real deployment on this machine: one SuperLink and N SuperNodes on 127.0.0.1, talking over
TLS on real sockets, each site with its own video-dir / out-dir / state-dir, then ``flwr run`` against them.

    python simulations/deploy_local.py WORKDIR --sites 2 --rounds 2 [--port 39500] [--insecure --no-auth]
        [--video-dirs DIR ...] [--node-config "max-epsilon=8 ..."] [--run-config "local-steps=4 ..." ...]
        [--trusted-entities | --cautious-site] [--keep-running]

WORKDIR receives: certs/ (from simulations/make_certs.sh), site_<i>/{videos,out,state}, server/ (checkpoints,
history.json, summary.json), logs/, and a Flower CLI home with a ``deploy`` connection. Sites without a
``--video-dirs`` entry get generated clips. Prints one JSON line (run id, status, paths) and exits 0 only when
the run's status is ``finished:completed`` (``flwr run --stream`` itself exits 0 even when a run fails).
Every process it started is stopped by PID at the end unless ``--keep-running``.

TLS and SuperNode authentication are on by default: the SuperLink runs with ``--enable-supernode-auth``, each
site gets an EC (SECP384R1) key pair in OpenSSH format, its public key is registered with
``flwr supernode register``, and the SuperNode signs in with ``--auth-supernode-private-key``; a SuperNode
whose key was not registered is refused. Each site's node config holds its privacy policy (``client.policy``;
the generated sites hold "real" video files, so the strict defaults apply), plus ``--node-config``.

``--trusted-entities`` starts every SuperNode with Flower's ``--trusted-entities`` (an Ed25519 app-signing
key made here), so that it runs only app bundles signed by that key; ``--cautious-site`` adds one such
SuperNode beside the others. Flower 1.41 cannot sign a locally submitted bundle: the SuperLink attaches
signatures only to apps it fetches from Flower Hub (``flwr app review`` submits them there), so such a
SuperNode refuses every run of this script ("The FAB could not be verified") and the server records it as
dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

from simulations.local_runtime import APP_DIR, flwr_bin, flwr_env, flwr_json, latest_run, wait_port


def _generate_site_videos(folder: Path, site: int, frames: int) -> None:
    from common.data.clips import generate_site_clip
    from common.data.video import write_video

    folder.mkdir(parents=True, exist_ok=True)
    for c in range(2):
        path = folder / f"clip_{c}.mkv"
        if not path.exists():
            write_video(path, generate_site_clip(site, c, 160, 120, frames), Fraction(25))


def make_node_key(path: Path) -> Path:
    """An EC SECP384R1 key pair in OpenSSH format (what Flower's SuperNode authentication expects)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not path.exists():
        key = ec.generate_private_key(ec.SECP384R1())
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            )
        )
        path.chmod(0o600)
        Path(f"{path}.pub").write_bytes(
            key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        )
    return path


def registered_nodes(work: Path, cli_home: Path) -> list[dict]:
    return flwr_json(["supernode", "list", "deploy"], work, cli_home, "nodes")


def check_intruder(work: Path, args, tls_node: list, cli_home: Path, logs: Path) -> bool:
    """Start a SuperNode with a key that was never registered: refused means it exits with an error and
    the SuperLink's node list does not grow."""
    before = len(registered_nodes(work, cli_home))
    key = make_node_key(work / "keys" / "intruder")
    home = work / "flwr-home" / "intruder"
    home.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            flwr_bin("flower-supernode"),
            *tls_node,
            "--auth-supernode-private-key",
            str(key),
            "--superlink",
            f"127.0.0.1:{args.port}",
            "--port",
            str(args.port + 2 + args.sites),
            "--node-config",
            "partition-id=99",
            "--max-retries",
            "1",
        ],
        cwd=work,
        env=flwr_env(home),
        stdout=open(logs / "intruder.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        rc = proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        stop([proc])
        return False
    return rc != 0 and len(registered_nodes(work, cli_home)) == before


def stop(procs: list[subprocess.Popen]) -> None:
    """Stop what we started: SIGTERM to each process group, then SIGKILL after a grace period."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.time() + 15
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir")
    ap.add_argument("--sites", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--port", type=int, default=39500, help="SuperLink port; SuperNodes use port+1+i")
    ap.add_argument("--insecure", action="store_true", help="plain HTTP instead of TLS (not for real sites)")
    ap.add_argument(
        "--auth",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="SuperNode authentication with registered keys (default on; needs TLS)",
    )
    ap.add_argument(
        "--check-intruder",
        action="store_true",
        help="with --auth: after the runs, start a SuperNode whose key was never registered and report "
        "whether the SuperLink refused it",
    )
    ap.add_argument(
        "--trusted-entities",
        action="store_true",
        help="start the SuperNodes with --trusted-entities (a fresh Ed25519 app-signing key): they run "
        "only app bundles signed by it. Flower 1.41 attaches signatures only to Flower Hub apps, "
        "so every locally submitted run is refused (see README, trust model)",
    )
    ap.add_argument("--cautious-site", action="store_true", help="one more SuperNode, with --trusted-entities")
    ap.add_argument("--video-dirs", nargs="*", default=[])
    ap.add_argument("--frames", type=int, default=48, help="frames per generated clip")
    ap.add_argument(
        "--node-config",
        default="",
        help="more node config for every site, e.g. a privacy policy: \"max-epsilon=8 release='eval,rd'\"",
    )
    ap.add_argument(
        "--run-config",
        action="append",
        default=None,
        help="run-config overrides, 'key=value ...'; repeat for runs one after the other on the same "
        "SuperNodes (run k > 1 writes to server/run_<k>)",
    )
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--keep-running", action="store_true")
    args = ap.parse_args(argv)
    if args.auth and args.insecure:
        ap.error("SuperNode authentication needs TLS: with --insecure add --no-auth")
    if (args.check_intruder or args.cautious_site) and not args.auth:
        ap.error("--check-intruder and --cautious-site need --auth")
    args.run_config = args.run_config or [""]
    return args


def make_signing_key(work: Path) -> Path:
    """An Ed25519 app-signing key of the operator, and the trusted-entities YAML a site would be given."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    path = work / "keys" / "trusted_entities.yaml"
    if not path.exists():
        key = ed25519.Ed25519PrivateKey.generate()
        (work / "keys" / "app_signing").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            )
        )
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        path.write_text(f'fedlvc-operator: "{public.decode()}"\n')
    return path


class Deployment:
    """A SuperLink and its SuperNodes on 127.0.0.1, stopped by PID on exit unless kept running."""

    def __init__(self, args):
        self.args, self.work = args, Path(args.workdir).resolve()
        self.logs, self.certs = self.work / "logs", self.work / "certs"
        self.cli_home = self.work / "flwr-home" / "cli"
        self.procs: list[subprocess.Popen] = []
        self.tls_link = (
            ["--insecure"]
            if args.insecure
            else [
                "--ssl-ca-certfile",
                str(self.certs / "ca.crt"),
                "--ssl-certfile",
                str(self.certs / "server.pem"),
                "--ssl-keyfile",
                str(self.certs / "server.key"),
            ]
        )
        self.tls_node = ["--insecure"] if args.insecure else ["--root-certificates", str(self.certs / "ca.crt")]

    def _spawn(self, cmd: list, cwd: Path, home: Path, log: str) -> subprocess.Popen:
        home.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=flwr_env(home),
            stdout=open(self.logs / log, "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def start_superlink(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        if not self.args.insecure and not (self.certs / "server.pem").exists():
            subprocess.run(
                ["bash", str(APP_DIR / "simulations" / "make_certs.sh"), str(self.certs)],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        self._spawn(
            [
                flwr_bin("flower-superlink"),
                *self.tls_link,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.args.port),
                "--disable-runtime-dependency-installation",
                "--database",
                str(self.work / "superlink.db"),
                *(["--enable-supernode-auth"] if self.args.auth else []),
            ],
            self.work,
            self.work / "flwr-home" / "superlink",
            "superlink.log",
        )
        wait_port(self.args.port)
        self.cli_home.mkdir(parents=True, exist_ok=True)
        conn = f'address = "127.0.0.1:{self.args.port}"\n' + (
            "insecure = true\n" if self.args.insecure else f'root-certificates = "{self.certs / "ca.crt"}"\n'
        )
        (self.cli_home / "config.toml").write_text(f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\n{conn}')

    def start_site(self, i: int, trusted: bool) -> None:
        """SuperNode i with its own video-dir, out-dir and state-dir (its privacy ledger)."""
        args, site = self.args, self.work / f"site_{i}"
        video_dir = Path(args.video_dirs[i]).resolve() if i < len(args.video_dirs) else site / "videos"
        if i >= len(args.video_dirs):
            _generate_site_videos(video_dir, i, args.frames)
        for sub in ("out", "state"):
            (site / sub).mkdir(parents=True, exist_ok=True)
        node_config = (
            f"partition-id={i} num-partitions={args.sites} site-name='site_{i}' video-dir='{video_dir}' "
            f"out-dir='{site / 'out'}' state-dir='{site / 'state'}' {args.node_config}"
        ).strip()
        auth = []
        if args.auth:
            (self.work / "keys").mkdir(exist_ok=True)
            key = make_node_key(self.work / "keys" / f"site_{i}")
            subprocess.run(
                [flwr_bin("flwr"), "supernode", "register", f"{key}.pub", "deploy"],
                cwd=self.work,
                env=flwr_env(self.cli_home),
                check=True,
                stdout=open(self.logs / f"register_{i}.log", "w"),
                stderr=subprocess.STDOUT,
                timeout=120,
            )
            auth = ["--auth-supernode-private-key", str(key)]
        if trusted:
            (self.work / "keys").mkdir(exist_ok=True)
            auth += ["--trusted-entities", str(make_signing_key(self.work))]
        self._spawn(
            [
                flwr_bin("flower-supernode"),
                *self.tls_node,
                *auth,
                "--superlink",
                f"127.0.0.1:{args.port}",
                "--port",
                str(args.port + 1 + i),
                "--node-config",
                node_config,
            ],
            site,
            self.work / "flwr-home" / f"supernode_{i}",
            f"supernode_{i}.log",
        )

    def run(self, k: int, overrides: str) -> dict:
        """Run k of the app on the deployment; its status from ``flwr list`` (``flwr run --stream`` exits 0
        even when a run fails)."""
        out = self.work / "server" if k == 1 else self.work / "server" / f"run_{k}"
        run_config = f"out-dir='{out}' num-server-rounds={self.args.rounds} min-sites={self.args.sites} {overrides}"
        run = subprocess.run(
            [flwr_bin("flwr"), "run", str(APP_DIR), "deploy", "--run-config", run_config.strip(), "--stream"],
            cwd=self.work,
            env=flwr_env(self.cli_home),
            stdout=open(self.logs / f"flwr-run_{k}.log", "w"),
            stderr=subprocess.STDOUT,
            timeout=self.args.timeout,
        )
        latest = latest_run(flwr_json(["list", "deploy"], self.work, self.cli_home, "runs"))
        return {
            "run_id": latest.get("run-id"),
            "status": latest.get("status"),
            "flwr_run_rc": run.returncode,
            "server_out": str(out),
        }


def main(argv=None) -> int:
    args = _parse(argv)
    deployment = Deployment(args)
    result = {"status": None}
    try:
        deployment.start_superlink()
        for i in range(args.sites):
            deployment.start_site(i, trusted=args.trusted_entities)
        if args.cautious_site:  # one more site that runs only signed app bundles
            deployment.start_site(args.sites, trusted=True)
        runs = [deployment.run(k, overrides) for k, overrides in enumerate(args.run_config, start=1)]
        work = deployment.work
        result = {
            **runs[0],
            "runs": runs,
            "status": runs[0]["status"]
            if len(runs) == 1
            else ("finished:completed" if all(r["status"] == "finished:completed" for r in runs) else "failed"),
            "sites": [str(work / f"site_{i}") for i in range(args.sites + args.cautious_site)],
            "tls": not args.insecure,
            "auth": args.auth,
            "logs": str(deployment.logs),
        }
        if args.check_intruder:
            result["intruder_refused"] = check_intruder(
                work, args, deployment.tls_node, deployment.cli_home, deployment.logs
            )
        if args.keep_running:
            result["pids"] = [p.pid for p in deployment.procs]
    finally:
        if not args.keep_running:
            stop(deployment.procs)
    print(json.dumps(result))
    return 0 if result.get("status") == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main())
