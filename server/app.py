"""The fedlvc Flower ServerApp: FedAvg weighted by each site's frame count, a checkpoint and ``history.json``
every round, each site's final compression with the global model, and a privacy/quality table at the end."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    FedAvg,
)
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from common.checkpoint import load_model, read_meta, save_model
from common.metrics import bd_rate
from common.training import with_temporal_prior
from common.fedconfig import RunConfig
from common.model import FedlvcCodec
from common.privacy import check_privacy_unit, epsilon_from_history
from common.video import atomic_output

app = ServerApp()


def _site_key(metrics) -> str:
    return f"site_{int(metrics['site_id'])}"


class SiteFedAvg(FedAvg):
    """FedAvg that records every site's reply, leaves out sites that declined (privacy budget spent) or
    failed, and keeps the previous global model when no site trained in a round."""

    def __init__(self, *args, average_all: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        # Under central DP every sampled site's (clipped) update is averaged with equal weight, a site that
        # declined contributing a zero update: the sensitivity S / sites-per-round must not depend on who trained.
        self.average_all = average_all
        self.train_log: dict[int, dict] = {}
        self.eval_log: dict[int, dict] = {}
        self.sampled: dict[int, list[int]] = {}  # round → node ids asked to train
        self.node_sites: dict[int, str] = {}  # node id → site, learned from replies
        self.clipping_norms: dict[int, float] = {}  # round → central-DP clipping norm sent to the sites

    def configure_train(self, server_round, arrays, config, grid):
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.sampled[server_round] = [int(m.metadata.dst_node_id) for m in messages]
        if KEY_CLIPPING_NORM in config:  # set by a central-DP wrapper around us: the norm this round used
            self.clipping_norms[server_round] = float(config[KEY_CLIPPING_NORM])
        return messages

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        valid, errors = self._check_and_log_replies(replies, is_train=True)
        sites, trained = {}, []
        for msg in valid:
            m = msg.content["metrics"]
            self.node_sites[int(msg.metadata.src_node_id)] = _site_key(m)
            sites[_site_key(m)] = {
                "epsilon": float(m["epsilon"]), "delta": float(m["delta"]),
                "noise_multiplier": float(m["noise_multiplier"]), "max_grad_norm": float(m["max_grad_norm"]),
                "sample_rate": float(m["sample_rate"]), "steps": int(m["steps"]),
                "dp_history": [[float(s), float(q), int(n)] for s, q, n in
                               zip(m["dp_sigma"], m["dp_sample_rate"], m["dp_steps"]) if n > 0],
                "num_examples": int(m["num-examples"]), "units": int(m["units"]),
                "privacy_unit": "segment" if int(m.get("unit-frames", 1)) > 1 else "frame",
                "unit_frames": int(m.get("unit-frames", 1)),
                "declined": bool(m["declined"]), "train_loss": float(m["train_loss"]),
            }
            if self.average_all or (not m["declined"] and m["num-examples"] > 0):
                trained.append(msg.content)
        answered = {int(r.metadata.src_node_id) for r in replies}
        dropped = [{"node_id": int(e.metadata.src_node_id), "reason": str(e.error.reason)} for e in errors]
        dropped += [{"node_id": nid, "reason": "no reply before the round timeout"}
                    for nid in self.sampled.get(server_round, []) if nid not in answered]
        for d in dropped:
            d["site"] = self.node_sites.get(d["node_id"])
        self.train_log[server_round] = {"sites": sites, "dropped": dropped}
        if not trained:
            return None, None
        arrays = aggregate_arrayrecords(trained, self.weighted_by_key)
        weights = [float(c["metrics"][self.weighted_by_key]) for c in trained]
        loss = sum(w * float(c["metrics"]["train_loss"]) for w, c in zip(weights, trained)) / sum(weights)
        return arrays, MetricRecord({"train_loss": loss, "sites_trained": len(trained)})

    def aggregate_evaluate(self, server_round, replies):
        valid, _ = self._check_and_log_replies(replies, is_train=False)
        if not valid:
            return None
        per_site = {_site_key(msg.content["metrics"]): {k: float(msg.content["metrics"][k])
                                                         for k in ("bpp", "psnr", "ms_ssim")} for msg in valid}
        self.eval_log[server_round] = per_site
        agg = self.evaluate_metrics_aggr_fn([msg.content for msg in valid], self.weighted_by_key)
        return agg


class CentralDP:
    """Site-level DP-FedAvg with Flower's client-side fixed clipping wrapper: each sampled site's update is
    clipped to S (``fixedclipping_mod``), the equal-weight average gets Gaussian noise of std z·S/n. Accounting:
    the Gaussian mechanism composed over rounds with RDP, no sampling amplification claimed (q = 1)."""

    def __init__(self, rc: RunConfig):
        self.z, self.clip, self.delta = rc.central_noise_multiplier, rc.central_clipping_norm, rc.delta
        self.mode = rc.central_dp
        self.sites = rc.central_sites or rc.min_sites
        self.accountant = rc.accountant

    def round_record(self, rounds_done: int, clipping_norm: float | None = None) -> dict:
        return {"unit": "site", "mode": self.mode, "noise_multiplier": self.z,
                "clipping_norm": self.clip if clipping_norm is None else clipping_norm,
                "sites_per_round": self.sites, "rounds": rounds_done, "delta": self.delta,
                "accountant": self.accountant, "sample_rate": 1.0,
                "epsilon": epsilon_from_history([(self.z, 1.0, rounds_done)], self.delta, self.accountant)}


def make_strategy(rc: RunConfig):
    """(strategy to run, the SiteFedAvg inside it, CentralDP or None)."""
    if rc.central_dp == "off":
        fedavg = SiteFedAvg(min_train_nodes=rc.min_sites, min_evaluate_nodes=rc.min_sites,
                            min_available_nodes=rc.min_sites)
        return fedavg, fedavg, None
    central = CentralDP(rc)
    # Sample exactly `sites` per round (fraction 0 → FedAvg takes min_train_nodes) so that the noise scale
    # z·S/n matches the number of updates averaged.
    fedavg = SiteFedAvg(fraction_train=1e-9, min_train_nodes=central.sites, min_evaluate_nodes=rc.min_sites,
                        min_available_nodes=max(rc.min_sites, central.sites), weighted_by_key="site-weight",
                        average_all=True)
    if rc.central_dp == "adaptive":
        # Andrew et al. 2021: Flower splits z between the update and the clipped-count query so that the two
        # together are one Gaussian mechanism with multiplier z; the accounting below is the same as fixed.
        wrapped = DifferentialPrivacyClientSideAdaptiveClipping(
            fedavg, noise_multiplier=central.z, num_sampled_clients=central.sites,
            initial_clipping_norm=central.clip, target_clipped_quantile=rc.central_target_quantile,
            clip_norm_lr=rc.central_clip_lr, clipped_count_stddev=rc.central_count_stddev or None)
    else:
        wrapped = DifferentialPrivacyClientSideFixedClipping(fedavg, noise_multiplier=central.z,
                                                             clipping_norm=central.clip,
                                                             num_sampled_clients=central.sites)
    return wrapped, fedavg, central


def _history_rounds(rc: RunConfig) -> list:
    """Every round of the ``history.json`` beside ``resume-from`` (none without it)."""
    history_file = Path(rc.resume_from).parent / "history.json" if rc.resume_from else None
    return json.loads(history_file.read_text())["rounds"] if history_file and history_file.is_file() else []


def _initial_model(rc: RunConfig) -> tuple[FedlvcCodec, int, list]:
    """(model, rounds already done, earlier history) from resume-from, init-model or the shipped model."""
    if rc.resume_from:
        model = load_model(rc.resume_from)
        done = int(read_meta(rc.resume_from).get("round", 0))
        return model, done, [r for r in _history_rounds(rc) if r["round"] <= done]
    return load_model(rc.init_model or None), 0, []


def earlier_ledgers(rounds: list, rc: RunConfig) -> dict:
    """{site: {"unit_frames", "history"}}: each site's DP history ``[[σ, q, steps], ...]`` as of the last of
    ``rounds`` it answered in — every round of the earlier run's ``history.json``, also those after the
    checkpoint resumed from (their updates were released: their privacy is spent). Sent with every training
    round, so that a site with no ledger on disk continues its ε instead of starting again from zero."""
    ledgers = {}
    for r in rounds:
        for key, s in r.get("sites", {}).items():
            if s.get("dp_history"):
                ledgers[key] = {"unit_frames": int(s.get("unit_frames", 1)), "history": s["dp_history"]}
    mixed = sorted(k for k, v in ledgers.items() if v["unit_frames"] != rc.unit_frames)
    if mixed:
        check_privacy_unit(ledgers[mixed[0]]["unit_frames"], rc.unit_frames,
                           f"resume-from: the earlier rounds of {', '.join(mixed)}", "resume with the same unit")
    return ledgers


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = RunConfig.from_mapping(context.run_config)
    out = rc.resolved_out_dir()
    out.mkdir(parents=True, exist_ok=True)
    model, offset, rounds = _initial_model(rc)
    ledgers = earlier_ledgers(_history_rounds(rc), rc)
    if rc.privacy_unit == "segment":
        model = with_temporal_prior(model)  # an intra-only starting model gains a P-frame prior to train
    model_config = json.dumps(model.cfg.to_dict())
    strategy, fedavg, central = make_strategy(rc)
    started = time.time()

    def write_history():
        with atomic_output(out / "history.json") as tmp:
            Path(tmp).write_text(json.dumps({"run_config": dict(context.run_config), "rounds": rounds}, indent=1))

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        r = offset + server_round
        train = fedavg.train_log.get(server_round, {"sites": {}, "dropped": []})
        evals = fedavg.eval_log.get(server_round, {})
        sites = train["sites"]
        for key, e in evals.items():
            sites.setdefault(key, {}).update({"eval": e})
        for s in sites.values():
            s["accountant"] = rc.accountant
        trained = [s for s in sites.values() if not s.get("declined") and s.get("num_examples")]
        weight = sum(s["num_examples"] for s in trained)
        evals_list = list(evals.values())
        mean = (lambda k: sum(e[k] for e in evals_list) / len(evals_list)) if evals_list else (lambda k: None)
        rounds.append({
            "round": r,
            "train_loss": (sum(s["train_loss"] * s["num_examples"] for s in trained) / weight) if weight else None,
            "psnr": mean("psnr"), "ms_ssim": mean("ms_ssim"), "bpp": mean("bpp"),
            "epsilon_max": max((s["epsilon"] for s in sites.values() if "epsilon" in s), default=0.0),
            "delta": rc.delta,
            "sites": sites,
            "dropped": train["dropped"],
            "wall_seconds": round(time.time() - started, 1),
        })
        if central is not None:  # site-level rounds so far, earlier runs resumed from included
            rounds[-1]["central_dp"] = central.round_record(sum(1 for x in rounds if "central_dp" in x) + 1,
                                                            fedavg.clipping_norms.get(server_round))
        # History first: a checkpoint on disk then always has its round in history.json (a resume reads both
        # and drops rounds after the checkpoint's).
        write_history()
        global_model = FedlvcCodec(model.cfg)
        global_model.load_state_dict(arrays.to_torch_state_dict())
        save_model(out / f"round_{r:03d}.safetensors", global_model,
                   {"round": r, "run_config": dict(context.run_config), "epsilon_max": rounds[-1]["epsilon_max"]})
        return None

    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=rc.num_server_rounds,
        timeout=rc.round_timeout,
        train_config=ConfigRecord({"model-config": model_config, "central-dp": rc.central_dp,
                                   "earlier-ledgers": json.dumps(ledgers)}),
        evaluate_config=ConfigRecord({"model-config": model_config}),
        evaluate_fn=after_round,
    )
    final = FedlvcCodec(model.cfg)
    final.load_state_dict(result.arrays.to_torch_state_dict())
    save_model(out / "final.safetensors", final, {"round": offset + rc.num_server_rounds,
                                                 "run_config": dict(context.run_config)})

    # Each site compresses its own video with the final global model; only a summary comes back.
    content = RecordDict({"arrays": ArrayRecord(final.state_dict()),
                          "config": ConfigRecord({"model-config": model_config, "quality": rc.final_quality})})
    messages = [Message(content=content, dst_node_id=nid, message_type="query.compress")
                for nid in grid.get_node_ids()]
    replies = list(grid.send_and_receive(messages, timeout=rc.round_timeout))
    compressed = {}
    for reply in replies:
        if reply.has_error():
            continue
        m = reply.content["metrics"]
        compressed[_site_key(m)] = {k: float(m[k]) for k in ("bytes", "frames", "bpp", "psnr", "quality")}
    gains = gain_over_public(grid, rc, final, public_model(rc))
    last = rounds[-1] if rounds else {"sites": {}}
    summary = {"rounds": offset + rc.num_server_rounds, "delta": rc.delta, "accountant": rc.accountant,
               "sites": {k: {"epsilon": last["sites"].get(k, {}).get("epsilon"),
                             "units": last["sites"].get(k, {}).get("units"), **v,
                             "gain_over_public": gains.get(k)}
                         for k, v in sorted(compressed.items())}}
    with atomic_output(out / "summary.json") as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=1))
    print(summary_table(summary, out))


def public_model(rc: RunConfig) -> FedlvcCodec:
    """The public starting point the federation fine-tunes: init-model, or the shipped model."""
    model = load_model(rc.init_model or None)
    return with_temporal_prior(model) if rc.privacy_unit == "segment" else model


def _rd_curves(grid: Grid, rc: RunConfig, model: FedlvcCodec) -> dict:
    """{site: [(bpp, psnr) per quality]} of ``model`` on each site's held-out frames (query.rd)."""
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "config": ConfigRecord({"model-config": json.dumps(model.cfg.to_dict())})})
    messages = [Message(content=content, dst_node_id=nid, message_type="query.rd") for nid in grid.get_node_ids()]
    curves = {}
    for reply in grid.send_and_receive(messages, timeout=rc.round_timeout):
        if not reply.has_error():
            m = reply.content["metrics"]
            curves[_site_key(m)] = list(zip(m["bpp"], m["psnr"]))
    return curves


def gain_over_public(grid: Grid, rc: RunConfig, final: FedlvcCodec, public: FedlvcCodec) -> dict:
    """Per site: BD-rate of the federated model against the public one on the site's own held-out frames
    (every quality level, coded as the final compression is), and the PSNR / bpp change at final-quality."""
    ours, theirs = _rd_curves(grid, rc, final), _rd_curves(grid, rc, public)
    gains = {}
    for site in sorted(set(ours) & set(theirs)):
        q = rc.final_quality - 1
        gains[site] = {"bd_rate_percent": bd_rate(theirs[site], ours[site]),
                       "psnr_db": ours[site][q][1] - theirs[site][q][1],
                       "bpp_ratio": ours[site][q][0] / theirs[site][q][0],
                       "public": theirs[site], "federated": ours[site]}
    return gains


def summary_table(summary: dict, out: Path) -> str:
    lines = [f"fedlvc: {summary['rounds']} rounds, delta={summary['delta']}, accountant={summary['accountant']}; "
             f"history in {out / 'history.json'}; each site's .lvc files are in its node-config out-dir "
             f"(default {out / 'sites' / '<site>'})",
             f"{'site':<10}{'frames':>8}{'epsilon':>10}{'bytes':>10}{'bpp':>8}{'PSNR':>8}{'BD-rate vs public':>19}"]
    for name, s in summary["sites"].items():
        eps = s["epsilon"]
        eps_text = "-" if eps is None else ("inf" if math.isinf(eps) else f"{eps:.2f}")
        gain = (s.get("gain_over_public") or {}).get("bd_rate_percent")
        gain_text = "-" if gain is None else f"{gain:+.1f} %"
        lines.append(f"{name:<10}{int(s['frames']):>8}{eps_text:>10}{int(s['bytes']):>10}{s['bpp']:>8.3f}"
                     f"{s['psnr']:>8.2f}{gain_text:>19}")
    lines.append("BD-rate vs public: the federated model against the public starting model on each site's "
                 "held-out frames (every quality; negative = fewer bits for the same PSNR)")
    return "\n".join(lines)
