"""Federation benchmarks; prints one JSON line.

    python benchmarks/federation.py default            # wall time of the default `flwr run .` simulation
                                                       # (4 sites, DP) vs the same run non-private
    python benchmarks/federation.py scale --small 10 --large 100
                                                       # peak memory of a simulation with many sites and tiny
                                                       # local work, large vs small, as a ratio

Each run uses its own FLWR_HOME and a SuperLink on a free port started here (and stopped by PID), so the
numbers are for a fresh simulation runtime. Peak memory is the largest sum of resident set sizes over the
SuperLink's whole process tree (SuperExec, ServerApp, Ray workers), sampled every 0.5 s from /proc.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

from simulations.local_runtime import SimulationRuntime


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                tree.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return tree


def tree_rss_mb(root: int) -> float:
    tree, total, stack = _children(), 0, [root]
    while stack:
        pid = stack.pop()
        stack.extend(tree.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def run_simulation(sites: int, run_config: str, cpus_per_site: int = 1) -> dict:
    """One `flwr run` on a fresh simulation SuperLink; returns wall time, peak RSS and status."""
    with tempfile.TemporaryDirectory() as tmp, SimulationRuntime(tmp) as runtime:
        peak, stop = [0.0], threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], tree_rss_mb(runtime.process.pid))
                time.sleep(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            start = time.perf_counter()
            run = runtime.run(f"{run_config} out-dir='{Path(tmp) / 'out'}'", sites, cpus_per_site)
            wall = time.perf_counter() - start
        finally:
            stop.set()
            sampler.join()
        return {"sites": sites, "wall_s": round(wall, 1), "peak_rss_mb": round(peak[0], 1), "status": run["status"]}


TINY = (
    "num-server-rounds=1 local-steps=1 batch-size=2 crop-size=16 demo-frames=4 demo-clips=1 demo-width=32 "
    "demo-height=32 eval-frames=1 min-sites={n}"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    d = sub.add_parser("default")
    d.add_argument("--sites", type=int, default=4)
    s = sub.add_parser("scale")
    s.add_argument("--small", type=int, default=10)
    s.add_argument("--large", type=int, default=100)
    args = ap.parse_args()
    info = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    if args.mode == "default":
        dp = run_simulation(args.sites, "noise-multiplier=1.0")
        plain = run_simulation(args.sites, "noise-multiplier=0.0")
        out = {
            "benchmark": "flwr_run_default",
            "dp": dp,
            "non_private": plain,
            "ratio": round(dp["wall_s"] / plain["wall_s"], 3),
            **info,
        }
    else:
        small = run_simulation(args.small, TINY.format(n=args.small))
        large = run_simulation(args.large, TINY.format(n=args.large))
        out = {
            "benchmark": "simulation_scale",
            "small": small,
            "large": large,
            "ratio": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
            **info,
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
