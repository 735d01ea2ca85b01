"""Run fedlvc as a real deployment on this machine: one SuperLink and N SuperNodes on 127.0.0.1, talking over
TLS on real sockets, each site with its own video-dir / out-dir / state-dir, then ``flwr run`` against them.

    python simulations/deploy_local.py WORKDIR --sites 2 --rounds 2 [--port 39500] [--insecure]
        [--auth] [--video-dirs DIR ...] [--run-config "local-steps=4 ..."] [--keep-running]

WORKDIR receives: certs/ (from simulations/make_certs.sh), site_<i>/{videos,out,state}, server/ (checkpoints,
history.json, summary.json), logs/, and a Flower CLI home with a ``deploy`` connection. Sites without a
``--video-dirs`` entry get generated clips. Prints one JSON line (run id, status, paths) and exits 0 only when
the run's status is ``finished:completed`` (``flwr run --stream`` itself exits 0 even when a run fails).
Every process it started is stopped by PID at the end unless ``--keep-running``.

With ``--auth`` the SuperLink runs with ``--enable-supernode-auth``: each site gets an EC (SECP384R1) key
pair in OpenSSH format, its public key is registered with ``flwr supernode register``, and the SuperNode
signs in with ``--auth-supernode-private-key``; a SuperNode whose key was not registered is refused.
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

APP_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(APP_DIR))

from simulations.local_runtime import flwr_bin, flwr_env, wait_port  # noqa: E402


def _generate_site_videos(folder: Path, site: int, frames: int) -> None:
    from common.data import generate_site_clip
    from common.video import write_video

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
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()))
        path.chmod(0o600)
        Path(f"{path}.pub").write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                      serialization.PublicFormat.OpenSSH))
    return path


def registered_nodes(work: Path, cli_home: Path) -> list[dict]:
    out = subprocess.run([flwr_bin("flwr"), "supernode", "list", "deploy", "--format", "json"], cwd=work,
                         env=flwr_env(cli_home), capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout[out.stdout.index("{"):]).get("nodes", [])


def check_intruder(work: Path, args, tls_node: list, cli_home: Path, logs: Path) -> bool:
    """Start a SuperNode with a key that was never registered: refused means it exits with an error and
    the SuperLink's node list does not grow."""
    before = len(registered_nodes(work, cli_home))
    key = make_node_key(work / "keys" / "intruder")
    home = work / "flwr-home" / "intruder"
    home.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([flwr_bin("flower-supernode"), *tls_node, "--auth-supernode-private-key", str(key),
                             "--superlink", f"127.0.0.1:{args.port}", "--port", str(args.port + 1 + args.sites),
                             "--node-config", "partition-id=99", "--max-retries", "1"],
                            cwd=work, env=flwr_env(home), stdout=open(logs / "intruder.log", "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir")
    ap.add_argument("--sites", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--port", type=int, default=39500, help="SuperLink port; SuperNodes use port+1+i")
    ap.add_argument("--insecure", action="store_true", help="plain HTTP instead of TLS (not for real sites)")
    ap.add_argument("--auth", action="store_true", help="SuperNode authentication with registered keys (needs TLS)")
    ap.add_argument("--check-intruder", action="store_true",
                    help="with --auth: after the run, start a SuperNode whose key was never registered and report "
                         "whether the SuperLink refused it")
    ap.add_argument("--video-dirs", nargs="*", default=[])
    ap.add_argument("--frames", type=int, default=48, help="frames per generated clip")
    ap.add_argument("--run-config", default="", help="extra run-config overrides, 'key=value ...'")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--keep-running", action="store_true")
    args = ap.parse_args(argv)
    if args.auth and args.insecure:
        ap.error("--auth needs TLS; drop --insecure")

    work = Path(args.workdir).resolve()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    certs = work / "certs"
    if not args.insecure and not (certs / "server.pem").exists():
        subprocess.run(["bash", str(APP_DIR / "simulations" / "make_certs.sh"), str(certs)], check=True,
                       stdout=subprocess.DEVNULL)
    tls_link = ["--insecure"] if args.insecure else [
        "--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.pem"),
        "--ssl-keyfile", str(certs / "server.key")]
    tls_node = ["--insecure"] if args.insecure else ["--root-certificates", str(certs / "ca.crt")]

    procs: list[subprocess.Popen] = []
    result = {"status": None}
    try:
        link_home = work / "flwr-home" / "superlink"
        link_home.mkdir(parents=True, exist_ok=True)
        procs.append(subprocess.Popen(
            [flwr_bin("flower-superlink"), *tls_link, "--host", "127.0.0.1", "--port", str(args.port),
             "--disable-runtime-dependency-installation", "--database", str(work / "superlink.db"),
             *(["--enable-supernode-auth"] if args.auth else [])],
            cwd=work, env=flwr_env(link_home), stdout=open(logs / "superlink.log", "w"), stderr=subprocess.STDOUT,
            start_new_session=True))
        wait_port(args.port)
        cli_home = work / "flwr-home" / "cli"
        cli_home.mkdir(parents=True, exist_ok=True)
        conn = f'address = "127.0.0.1:{args.port}"\n' + (
            "insecure = true\n" if args.insecure else f'root-certificates = "{certs / "ca.crt"}"\n')
        (cli_home / "config.toml").write_text(f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\n{conn}')
        for i in range(args.sites):
            site = work / f"site_{i}"
            video_dir = Path(args.video_dirs[i]).resolve() if i < len(args.video_dirs) else site / "videos"
            if i >= len(args.video_dirs):
                _generate_site_videos(video_dir, i, args.frames)
            for sub in ("out", "state"):
                (site / sub).mkdir(parents=True, exist_ok=True)
            node_config = (f"partition-id={i} num-partitions={args.sites} site-name='site_{i}' "
                           f"video-dir='{video_dir}' out-dir='{site / 'out'}' state-dir='{site / 'state'}'")
            home = work / "flwr-home" / f"supernode_{i}"
            home.mkdir(parents=True, exist_ok=True)
            auth = []
            if args.auth:
                (work / "keys").mkdir(exist_ok=True)
                key = make_node_key(work / "keys" / f"site_{i}")
                subprocess.run([flwr_bin("flwr"), "supernode", "register", f"{key}.pub", "deploy"], cwd=work,
                               env=flwr_env(cli_home), check=True, stdout=open(logs / f"register_{i}.log", "w"),
                               stderr=subprocess.STDOUT, timeout=120)
                auth = ["--auth-supernode-private-key", str(key)]
            procs.append(subprocess.Popen(
                [flwr_bin("flower-supernode"), *tls_node, *auth, "--superlink", f"127.0.0.1:{args.port}",
                 "--port", str(args.port + 1 + i), "--node-config", node_config],
                cwd=site, env=flwr_env(home), stdout=open(logs / f"supernode_{i}.log", "w"),
                stderr=subprocess.STDOUT, start_new_session=True))

        run_config = (f"out-dir='{work / 'server'}' num-server-rounds={args.rounds} min-sites={args.sites} "
                      + args.run_config).strip()
        run = subprocess.run([flwr_bin("flwr"), "run", str(APP_DIR), "deploy", "--run-config", run_config, "--stream"],
                             cwd=work, env=flwr_env(cli_home), stdout=open(logs / "flwr-run.log", "w"),
                             stderr=subprocess.STDOUT, timeout=args.timeout)
        listing = subprocess.run([flwr_bin("flwr"), "list", "deploy", "--format", "json"], cwd=work,
                                 env=flwr_env(cli_home), capture_output=True, text=True, timeout=120)
        runs = json.loads(listing.stdout[listing.stdout.index("{"):]).get("runs", [])
        latest = max(runs, key=lambda r: r.get("pending-at", "")) if runs else {}
        result = {"run_id": latest.get("run-id"), "status": latest.get("status"), "flwr_run_rc": run.returncode,
                  "server_out": str(work / "server"), "sites": [str(work / f"site_{i}") for i in range(args.sites)],
                  "tls": not args.insecure, "auth": args.auth, "logs": str(logs)}
        if args.auth and args.check_intruder:
            result["intruder_refused"] = check_intruder(work, args, tls_node, cli_home, logs)
        if args.keep_running:
            result["pids"] = [p.pid for p in procs]
    finally:
        if not args.keep_running:
            stop(procs)
    print(json.dumps(result))
    return 0 if result.get("status") == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main())
