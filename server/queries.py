"""The queries after the last round (each site compresses its own video, and measures the final and the public
model on its held-out frames) and the run's summary: ``summary.json`` and the privacy/quality table."""

from __future__ import annotations

import json
import math
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common.checkpoint import load_model
from common.config.fedconfig import RunConfig
from common.eval.metrics import bd_rate
from common.net.model import FedlvcCodec, with_adapters, with_temporal_prior

from .replies import answers, checked_compress_summary, checked_rd_curves
from .strategy import SiteFedAvg


def releases(rounds: list, site: str, compressed: dict, gain: dict | None) -> dict:
    """How many non-DP numbers of each kind the site released to this server in this run."""
    counts = {"train-loss": 0, "eval": 0, "rd": int(gain is not None), "compress-summary": int("bytes" in compressed)}
    for r in rounds:
        for kind in r.get("sites", {}).get(site, {}).get("released", []):
            counts[kind] += 1
    return counts


def query(grid: Grid, rc: RunConfig, kind: str, records: dict, config: dict, fedavg: SiteFedAvg, check) -> dict:
    """Send a query to every site, for the last round it was asked to train in (a site answers one query of each
    kind for the latest round it trained in, asked for that round or a later one); {site: check(reply)} or
    {site: {"refused" | "dropped": why}}."""
    messages = []
    node_ids = list(grid.get_node_ids())
    for nid in node_ids:
        last = max((r for r, nodes in fedavg.sampled.items() if nid in nodes), default=0)
        content = RecordDict({**records, "config": ConfigRecord({**config, "server-round": last})})
        messages.append(Message(content=content, dst_node_id=nid, message_type=f"query.{kind}"))
    replies = list(grid.send_and_receive(messages, timeout=rc.round_timeout))
    out = answers(replies, fedavg.registry, check)
    replied = {int(m.metadata.src_node_id) for m in replies}
    for nid in node_ids:  # a site that did not answer in time is listed, not left out of the summary
        if int(nid) not in replied:
            label = fedavg.registry.known(nid)
            why = f"no reply to query.{kind} within round-timeout ({rc.round_timeout:g} s)"
            out.setdefault(label, {"dropped": why})
    return out


def final_compression(grid: Grid, rc: RunConfig, final: FedlvcCodec, fedavg: SiteFedAvg) -> dict:
    """Each site compresses its own video with the final global model into its own out-dir; {site: summary,
    or {} when the site does not release one, or {"refused" | "dropped": why}}."""
    config = {"model-config": json.dumps(final.cfg.to_dict()), "quality": rc.final_quality}
    return query(
        grid,
        rc,
        "compress",
        {"arrays": ArrayRecord(final.state_dict())},
        config,
        fedavg,
        lambda r: checked_compress_summary(r) or {},
    )


def public_model(rc: RunConfig) -> FedlvcCodec:
    """The public starting point the federation fine-tunes: init-model, or the shipped model."""
    model = load_model(rc.init_model or None)
    model = with_temporal_prior(model) if rc.privacy_unit == "segment" else model
    return with_adapters(model) if rc.train_parts == "adapters" else model  # identity adapters: codes as before


def gain_over_public(grid: Grid, rc: RunConfig, final: FedlvcCodec, public: FedlvcCodec, fedavg: SiteFedAvg) -> dict:
    """Per site: BD-rate of the federated model against the public one on the site's own held-out frames
    (every quality level, coded as the final compression is), and the PSNR / bpp change at final-quality.
    One query.rd carries both models (a site answers one a round)."""
    records = {"federated": ArrayRecord(final.state_dict()), "public": ArrayRecord(public.state_dict())}
    curves = query(
        grid,
        rc,
        "rd",
        records,
        {"model-config": json.dumps(final.cfg.to_dict())},
        fedavg,
        lambda r: checked_rd_curves(r, ("federated", "public"), final.cfg.num_levels, ("personal",)),
    )
    gains = {}
    q = rc.final_quality - 1
    for site, c in sorted(curves.items()):
        if "federated" not in c:
            continue
        gains[site] = {
            name: site_gain(c["public"], c[name], q, name) for name in ("federated", "personal") if name in c
        }
    return gains


def site_gain(public: list, ours: list, q: int, name: str) -> dict:
    """A site's model (``name``: federated, or its personal one) against the public model on its held-out frames:
    BD-rate over every quality level, PSNR and bpp change at final-quality, both curves."""
    return {
        "bd_rate_percent": bd_rate(public, ours),
        "psnr_db": ours[q][1] - public[q][1],
        "bpp_ratio": ours[q][0] / public[q][0],
        "public": public,
        name: ours,
    }


def summary(rc: RunConfig, offset: int, rounds: list, compressed: dict, gains: dict, registry) -> dict:
    """``summary.json``: per site (by its label, with the node id that names it) its last ε and δ, what its
    final compression gave, its gains over the public model and the non-DP numbers it released."""
    last = rounds[-1] if rounds else {"sites": {}}
    return {
        "rounds": offset + rc.num_server_rounds,
        "sites": {
            k: {
                "node_id": registry.node_of(k),  # what names a site: a label is only what it claimed first
                **{f: last["sites"].get(k, {}).get(f) for f in ("epsilon", "delta", "accountant", "units")},
                **v,
                "gain_over_public": gains.get(k, {}).get("federated"),
                **({"gain_over_public_personal": gains.get(k, {}).get("personal")} if rc.personal_steps else {}),
                "releases": releases(rounds, k, v, gains.get(k)),
            }
            for k, v in sorted(compressed.items())
        },
    }


def summary_table(summary: dict, out: Path) -> str:
    personal = any("gain_over_public_personal" in s for s in summary["sites"].values())
    width = max([12, *(len(name) + 1 for name in summary["sites"])])  # a label is up to 64 + "@node_<id>"
    lines = [
        f"fedlvc: {summary['rounds']} rounds; history in {out / 'history.json'}; each site wrote its .lvc files "
        "to its own node-config out-dir, else <state-dir>/out, else (a simulated site) runs/sites/<site> "
        "under the simulation's working folder",
        f"{'site':<{width}}{'node':>21}{'frames':>8}{'epsilon':>10}{'delta':>9}{'bytes':>10}{'bpp':>8}{'PSNR':>8}"
        f"{'BD-rate vs public':>19}" + (f"{'+ personal':>12}" if personal else ""),
    ]
    for name, s in summary["sites"].items():
        eps = s["epsilon"]
        eps_text = "-" if eps is None else ("inf" if math.isinf(eps) else f"{eps:.2f}")
        gain = (s.get("gain_over_public") or {}).get("bd_rate_percent")
        gain_text = "-" if gain is None else f"{gain:+.1f} %"
        delta = "-" if s.get("delta") is None else f"{s['delta']:.0e}"
        if "bytes" in s:
            size = (
                f"{int(s['frames']):>8}{eps_text:>10}{delta:>9}{int(s['bytes']):>10}{s['bpp']:>8.3f}{s['psnr']:>8.2f}"
            )
        else:
            note = s.get("refused") or s.get("dropped") or "summary not released"
            size = f"{'-':>8}{eps_text:>10}{delta:>9}  ({note})"[:80]
        mine = (s.get("gain_over_public_personal") or {}).get("bd_rate_percent")
        mine_text = (f"{'-' if mine is None else f'{mine:+.1f} %':>12}") if personal else ""
        node = "-" if s.get("node_id") is None else s["node_id"]
        lines.append(f"{name:<{width}}{node:>21}{size}{gain_text:>19}{mine_text}")
    lines.append(
        "BD-rate vs public: the federated model against the public starting model on each site's "
        "held-out frames (every quality; negative = fewer bits for the same PSNR)"
        + ("; + personal: the site's personal model (fine-tuned at the site, never sent)" if personal else "")
    )
    return "\n".join(lines)
