"""Measure one sweep setting whose run stopped before its ``summary.json``: what the sweep and the sites would
have reported for its final shared model, with the functions they use.

- per site: BD-rate of the final model (and of the site's stored personal model, when one is under
  ``SITES_DIR/<site>/personal/``) against the public model on the site's held-out frames, as ``query.rd``
  measures them (``load_site``, ``client.app._measure`` at every quality level, ``server.app._gain``);
- pooled: PSNR of the public and final models at the matched rate (median of the public curve's bpp) on all
  sites' held-out frames, as the sweep's ``study.json`` (``held_out_frames``, ``fedlvc_points``,
  ``psnr_at_bpp``).

    python -m simulations.measure_setting runs/study3/runs/sigma_1.39 --sites 4 \\
        --sites-dir runs/study3/runtime/runs/sites

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from client.app import _measure
from client.policy import SitePolicy
from client.site import load_site
from common.checkpoint import load_model
from common.evaluate import fedlvc_points
from common.fedconfig import RunConfig
from server.app import _gain, public_model
from simulations.sweep import held_out_frames, psnr_at_bpp


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="runs/<setting>/ of a sweep (history.json, final.safetensors)")
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--sites-dir", type=Path, help="the simulated sites' state (their personal/ folders)")
    args = ap.parse_args(argv)
    rc = RunConfig.from_mapping(json.loads((args.run_dir / "history.json").read_text())["run_config"])
    final = load_model(args.run_dir / "final.safetensors").eval()
    public = public_model(rc).eval()
    q = rc.final_quality - 1
    out = {"sites": {}}
    for pid in range(args.sites):
        node_config = {"partition-id": pid, "num-partitions": args.sites}
        frames = np.stack(load_site(node_config, rc, SitePolicy.of(node_config), pid).held_out)
        models = {"public": public, "federated": final}
        stored = sorted(args.sites_dir.glob(f"site_{pid}/personal/personal-*.safetensors")) if args.sites_dir else []
        if stored:
            models["personal"] = load_model(stored[0]).eval()
        curves = {}
        for name, m in models.items():
            points = [_measure(m, frames, level, rc, with_ms_ssim=False) for level in range(1, m.cfg.num_levels + 1)]
            curves[name] = [(p["bpp"], p["psnr"]) for p in points]
        out["sites"][f"site_{pid}"] = {
            name: _gain(curves["public"], curves[name], q, name)["bd_rate_percent"]
            for name in curves
            if name != "public"
        }
    frames = held_out_frames(rc, args.sites)
    levels = list(range(1, public.cfg.num_levels + 1))
    pooled = {name: fedlvc_points(frames, m, levels, 25)[0] for name, m in (("public", public), ("final", final))}
    matched = float(np.median([p["bpp"] for p in pooled["public"]]))
    out["matched_bpp"] = matched
    out["psnr_at_matched_bpp"] = {name: psnr_at_bpp(points, matched) for name, points in pooled.items()}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
