"""Measure one sweep setting whose run stopped before its ``summary.json``: what the sweep and the sites would
have reported for its final shared model, with the functions they use.

- per site: BD-rate of the final model (and of the personal model the site stored for it, when
  ``SITES_DIR/<site>/personal/`` holds one) against the public model on the site's held-out frames, as ``query.rd``
  measures them (``load_site``, ``client.measure.rd_points``, ``server.queries.site_gain``);
- ``--train-personal N ...``: first trains the personal models those sites had not stored yet, as the site does
  in ``query.compress`` / ``query.rd`` (``client.personal.personal_model`` from the final model, on the site's
  training rows, with the site's seed, stored where the simulated site keeps it), so a run stopped while its
  sites were fine-tuning can be measured whole;
- pooled: PSNR of the public and final models at the matched rate (median of the public curve's bpp) on all
  sites' held-out frames, as the sweep's ``study.json`` (``held_out_frames``, ``fedlvc_points``,
  ``psnr_at_bpp``).

    python -m simulations.measure_setting runs/study3/runs/sigma_1.39 --sites 4 \\
        --sites-dir runs/study3/runtime/runs/sites [--train-personal 2 3] [--train-only]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import numpy as np

from client.measure import rd_points
from client.personal import personal_file, personal_model, personal_seed
from client.policy import SitePolicy
from client.site import SIMULATED_OUT, load_site, site_identity
from common.checkpoint import fingerprint, load_model
from common.config.fedconfig import RunConfig
from common.errors import FedlvcError
from common.eval.evaluate import fedlvc_points
from server.queries import public_model, site_gain
from simulations.sweep import held_out_frames, psnr_at_bpp


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="runs/<setting>/ of a sweep (history.json, final.safetensors)")
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--sites-dir", type=Path, help="the simulated sites' state (their personal/ folders)")
    ap.add_argument(
        "--train-personal",
        type=int,
        nargs="+",
        default=[],
        metavar="N",
        help="first train the personal models these sites (partition ids) had not stored (needs --sites-dir)",
    )
    ap.add_argument("--train-only", action="store_true", help="train (--train-personal) and stop; measure nothing")
    args = ap.parse_args(argv)
    rc = RunConfig.from_mapping(json.loads((args.run_dir / "history.json").read_text())["run_config"])
    final = load_model(args.run_dir / "final.safetensors").eval()
    fp = fingerprint(final).hex()
    public = public_model(rc).eval()
    for pid in args.train_personal:
        train_personal(final, rc, pid, args.sites, args.sites_dir)
    if args.train_only:
        return {}
    q = rc.final_quality - 1
    out = {"sites": {}}
    for pid in range(args.sites):
        node_config = {"partition-id": pid, "num-partitions": args.sites}
        frames = np.stack(load_site(node_config, rc, SitePolicy.of(node_config), pid).held_out)
        models = {"public": public, "federated": final}
        stored = args.sites_dir / f"site_{pid}" / "personal" / personal_file(fp, rc) if args.sites_dir else None
        if stored is not None and stored.is_file():
            models["personal"] = load_model(stored).eval()
        curves = {}
        for name, m in models.items():
            curves[name] = [(p["bpp"], p["psnr"]) for p in rd_points(m, frames, rc)]
        out["sites"][f"site_{pid}"] = {
            name: site_gain(curves["public"], curves[name], q, name)["bd_rate_percent"]
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


def train_personal(final, rc: RunConfig, pid: int, sites: int, sites_dir: Path | None) -> Path:
    """Site ``pid``'s personal model from ``final``, as ``client.app._coding_model`` makes it (loaded if the site
    stored it already), in the folder the simulated site keeps it in: ``SITES_DIR`` is ``<its cwd>/runs/sites``."""
    if sites_dir is None or sites_dir.resolve().parts[-2:] != SIMULATED_OUT.parts:
        raise FedlvcError(f"--train-personal needs --sites-dir <runtime>/{SIMULATED_OUT}, not {sites_dir}")
    node_config = {"partition-id": pid, "num-partitions": sites}
    policy = SitePolicy.of(node_config)
    name, number = site_identity(node_config)
    with contextlib.chdir(sites_dir.resolve().parent.parent):  # the simulated site's cwd
        site = load_site(node_config, rc, policy, number)
        _, note = personal_model(final, site.train_rows, rc, policy, node_config, name, personal_seed(rc, number))
    if note:
        raise FedlvcError(f"{name}: {note}")
    return sites_dir / name / "personal"


if __name__ == "__main__":
    try:
        main()
    except FedlvcError as e:
        raise SystemExit(f"measure_setting: {e}") from None
