"""The fedlvc Flower ServerApp: FedAvg weighted by each site's frame count, a checkpoint and ``history.json``
every round, each site's final compression with the global model, and a privacy/quality table at the end."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    FedAvg,
)
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from common.checkpoint import load_model, read_meta, save_model
from common.fedconfig import RunConfig
from common.metrics import bd_rate
from common.model import FedlvcCodec, with_adapters, with_temporal_prior
from common.privacy import check_privacy_unit, epsilon_from_history
from common.video import atomic_output

from .replies import (
    BadReply,
    SiteRegistry,
    answers,
    checked_arrays,
    checked_compress_summary,
    checked_eval_metrics,
    checked_rd_curves,
    checked_train_metrics,
    clip_note,
)
from .secure import PROTOCOL, SecureRound, secure_round

app = ServerApp()


class SiteFedAvg(FedAvg):
    """FedAvg over checked replies (``server.replies``): a reply with a wrong key, shape or dtype (in its
    metadata or in the bytes it decodes to), a value that is not finite, or a weight larger than the units the
    site holds is dropped with the reason; sites that declined (privacy budget spent, or their policy refused
    the round) are recorded with their reason and left out. Each update is clipped to ``max-update-norm``, and
    ``aggregation`` may replace the weighted mean by a coordinate-wise median or trimmed mean. A round in
    which no site trained keeps the previous global model. Sites are keyed by Flower's node id
    (``SiteRegistry``)."""

    def __init__(self, rc: RunConfig, *args, average_all: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        # Under central DP every sampled site's (clipped) update is averaged with equal weight, whatever the
        # reply says, a site that declined or was dropped contributing a zero update: the sensitivity
        # S / sites-per-round must not depend on who trained or on what a site reports.
        self.rc, self.average_all = rc, average_all
        self.registry = SiteRegistry()
        self.train_log: dict[int, dict] = {}
        self.eval_log: dict[int, dict] = {}
        self.sampled: dict[int, list[int]] = {}  # round → node ids asked to train
        self.sent: dict[int, ArrayRecord] = {}  # this round → the global model sent to train
        self.clipping_norms: dict[int, float] = {}  # round → central-DP clipping norm sent to the sites
        self.secure: dict[int, SecureRound] = {}  # this round → what SecAgg+ gave (secure-aggregation)

    def configure_train(self, server_round, arrays, config, grid):
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.sampled[server_round] = [int(m.metadata.dst_node_id) for m in messages]
        self.sent = {server_round: arrays}  # the current round's only: a model per round would pile up
        if KEY_CLIPPING_NORM in config:  # set by a central-DP wrapper around us: the norm this round used
            self.clipping_norms[server_round] = float(config[KEY_CLIPPING_NORM])
        if self.rc.secure_aggregation and messages:
            # The whole round runs here, as SecAgg+'s four stages; Flower's loop then has nothing to send and
            # aggregate_train takes what the protocol revealed.
            config = messages[0].content["config"]
            self.secure = {
                server_round: secure_round(
                    grid,
                    self.sampled[server_round],
                    arrays,
                    config,
                    server_round,
                    self.rc.secagg_threshold,
                    self.rc.round_timeout,
                )
            }
            return []
        return messages

    def configure_evaluate(self, server_round, arrays, config, grid):
        """Evaluate the sites asked to train this round (a site answers one evaluation per training round)."""
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, self.sampled.get(server_round, []), MessageType.EVALUATE)

    def _update(self, server_round: int, base: list[np.ndarray], model: list[np.ndarray]) -> tuple[list, dict]:
        """(a site's decoded model as an update to average, {update_norm, clipped_to} for history.json): its
        update (model - global model) clipped to max-update-norm and, under central DP, to the round's norm
        (an honest site's mod already clipped it; a hostile one's is not trusted to)."""
        bounds = [self.rc.max_update_norm] if self.rc.max_update_norm > 0 else []
        if self.average_all and server_round in self.clipping_norms:
            bounds.append(self.clipping_norms[server_round])
        delta, norm, scale = _bounded([m.astype(np.float64) - b for m, b in zip(model, base)], min(bounds, default=0))
        return [b + d for b, d in zip(base, delta)], {"update_norm": norm, **scale}

    def aggregate_train(self, server_round, replies):
        sent = self.sent[server_round]
        base = [a.numpy().astype(np.float64) for a in sent.values()]
        secure = self.secure.get(server_round) if self.rc.secure_aggregation else None
        if secure is not None:
            replies = secure.replies
        sites, dropped, updates, weights = {}, [], [], []
        answered = set()
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            answered.add(node)
            label = self.registry.of(msg)
            try:
                if msg.has_error():
                    raise BadReply(clip_note(msg.error.reason))
                record = checked_train_metrics(msg, self.rc)
                arrays = None if secure else checked_arrays(msg, sent)  # under SecAgg+ there is none to check
            except BadReply as e:
                dropped.append({"node_id": node, "site": label, "reason": str(e)})
                continue
            sites[label] = {"node_id": node, **record}
            if not record["declined"]:
                update, bound = (None, {}) if secure else self._update(server_round, base, arrays)
                sites[label].update(bound)
                updates.append(update)
                weights.append(1.0 if self.average_all else float(record["num_examples"]))
        failed = secure.failed if secure else {}  # a node that left SecAgg+ before its masked update
        dropped += [
            {
                "node_id": n,
                "site": self.registry.known(n),
                "reason": clip_note(failed.get(n, "no reply before the round timeout")),
            }
            for n in self.sampled.get(server_round, [])
            if n not in answered
        ]
        trained = len(updates)
        self.train_log[server_round] = {"sites": sites, "dropped": dropped, "sites_trained": trained}
        if secure is not None:
            return self._secure_result(server_round, base, sent, secure, trained)
        if not trained:
            return None, None  # Flower's loop keeps the previous global model
        if self.average_all:  # every other sampled site (declined, dropped, silent) adds a zero update
            updates += [base] * (len(self.sampled.get(server_round, [])) - trained)
            weights += [1.0] * (len(updates) - len(weights))
        combined = combine(self.rc, updates, weights)
        arrays = ArrayRecord({k: Array(np.asarray(v, dtype=a.dtype)) for (k, a), v in zip(sent.items(), combined)})
        return arrays, MetricRecord({"sites_trained": trained})

    def _secure_result(self, server_round, base, sent, secure: SecureRound, trained: int):
        """The global model after a SecAgg+ round: the previous one plus the mean update the protocol revealed
        (the sites that trained count once each); the previous one kept when the protocol halted, no site
        trained, or the sum is not finite (a site sent garbage: under SecAgg+ nobody can tell which). A site whose
        clear record was dropped (a bad metric) is still in the sum: the protocol added its masked update, and
        the server cannot take one update out of a sum it never saw the parts of. max-update-norm bounds the
        mean update here, not one site's: it caps how far one round moves the model, whoever moved it."""
        log = self.train_log[server_round]
        mean, note, bound = secure.mean_update, "", {}
        if not trained:
            note = "no site trained"
        elif mean is None:
            note = "the SecAgg+ protocol halted (too few sites answered a stage to unmask the sum)"
        elif len(mean) != len(base) or any(m.shape != b.shape for m, b in zip(mean, base)):
            note = "the unmasked sum does not have the model's shapes"
        elif not all(np.isfinite(m).all() for m in mean):
            note = "the unmasked sum is not finite (a site's update was not); the round is void"
        else:
            mean, norm, bound = _bounded([np.asarray(m, dtype=np.float64) for m in mean], self.rc.max_update_norm)
            bound["update_norm"] = norm
        log["secure_aggregation"] = {
            "protocol": PROTOCOL,
            "shares": secure.shares,
            "threshold": secure.threshold,
            "completed": secure.completed,
            "sites_in_sum": trained if not note else 0,
            **({"restarted_without": secure.restarted_without} if secure.restarted_without else {}),
            **({"note": note} if note else {}),
            **bound,
        }
        if note:
            log["sites_trained"] = 0
            return None, None
        arrays = ArrayRecord(
            {k: Array(np.asarray(b + m, dtype=a.dtype)) for (k, a), b, m in zip(sent.items(), base, mean)}
        )
        return arrays, MetricRecord({"sites_trained": trained})

    def aggregate_evaluate(self, server_round, replies):
        per_site = answers(replies, self.registry, checked_eval_metrics)
        self.eval_log[server_round] = per_site
        answered = [e for e in per_site.values() if "psnr" in e]
        if not answered:
            return None
        return MetricRecord({k: sum(e[k] for e in answered) / len(answered) for k in ("bpp", "psnr", "ms_ssim")})


def _bounded(delta: list[np.ndarray], bound: float) -> tuple[list[np.ndarray], float, dict]:
    """(``delta`` scaled down to L2 norm ``bound`` where it is larger (0: no bound), its norm, {"clipped_to": bound}
    when it was scaled). A site's finite float32 values square to at most 1.2e77: float64 holds their sum."""
    norm = math.sqrt(sum(float(np.vdot(d, d)) for d in delta))
    if bound <= 0 or norm <= bound:
        return delta, norm, {}
    return [d * (bound / norm) for d in delta], norm, {"clipped_to": bound}


def combine(rc: RunConfig, models: list[list[np.ndarray]], weights: list[float]) -> list[np.ndarray]:
    """The round's global model from the sites' (bounded) models: their mean weighted by ``weights``, or, robust
    to a minority of hostile sites, their coordinate-wise median or trimmed mean (Flower's ``trim_mean``, the
    one of its FedTrimmedAvg), each site counting once: a weight is what a site claims, a robust rule cannot
    take it."""
    if rc.aggregation == "median":
        return [np.median(np.stack(layer), axis=0) for layer in zip(*models)]
    if rc.aggregation == "trimmed-mean":
        return [trim_mean(np.stack(layer), rc.trim_fraction) for layer in zip(*models)]
    total = sum(weights)
    return [sum(w / total * m[i] for w, m in zip(weights, models)) for i in range(len(models[0]))]


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
        return {
            "unit": "site",
            "mode": self.mode,
            "noise_multiplier": self.z,
            "clipping_norm": self.clip if clipping_norm is None else clipping_norm,
            "sites_per_round": self.sites,
            "rounds": rounds_done,
            "delta": self.delta,
            "accountant": self.accountant,
            "sample_rate": 1.0,
            "epsilon": epsilon_from_history([(self.z, 1.0, rounds_done)], self.delta, self.accountant),
        }


def make_strategy(rc: RunConfig):
    """(strategy to run, the SiteFedAvg inside it, CentralDP or None)."""
    if rc.central_dp == "off":
        fedavg = SiteFedAvg(
            rc, min_train_nodes=rc.min_sites, min_evaluate_nodes=rc.min_sites, min_available_nodes=rc.min_sites
        )
        return fedavg, fedavg, None
    central = CentralDP(rc)
    # Sample exactly `sites` per round (fraction 0 → FedAvg takes min_train_nodes) so that the noise scale
    # z·S/n matches the number of updates averaged.
    fedavg = SiteFedAvg(
        rc,
        fraction_train=1e-9,
        min_train_nodes=central.sites,
        min_evaluate_nodes=rc.min_sites,
        min_available_nodes=max(rc.min_sites, central.sites),
        average_all=True,
    )
    if rc.central_dp == "adaptive":
        # Andrew et al. 2021: Flower splits z between the update and the clipped-count query so that the two
        # together are one Gaussian mechanism with multiplier z; the accounting below is the same as fixed.
        wrapped = DifferentialPrivacyClientSideAdaptiveClipping(
            fedavg,
            noise_multiplier=central.z,
            num_sampled_clients=central.sites,
            initial_clipping_norm=central.clip,
            target_clipped_quantile=rc.central_target_quantile,
            clip_norm_lr=rc.central_clip_lr,
            clipped_count_stddev=rc.central_count_stddev or None,
        )
    else:
        wrapped = DifferentialPrivacyClientSideFixedClipping(
            fedavg, noise_multiplier=central.z, clipping_norm=central.clip, num_sampled_clients=central.sites
        )
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
        check_privacy_unit(
            ledgers[mixed[0]]["unit_frames"],
            rc.unit_frames,
            f"resume-from: the earlier rounds of {', '.join(mixed)}",
            "resume with the same unit",
        )
    return ledgers


class RoundRecorder:
    """``history.json`` and a checkpoint after every round (Flower calls :meth:`after_round` with the global
    model it keeps): the history first, so a checkpoint on disk always has its round in history.json."""

    def __init__(
        self,
        out: Path,
        rc: RunConfig,
        context: Context,
        model: FedlvcCodec,
        offset: int,
        rounds: list,
        fedavg: SiteFedAvg,
        central: CentralDP | None,
    ):
        self.out, self.rc, self.run_config, self.model = out, rc, dict(context.run_config), model
        self.offset, self.rounds, self.fedavg, self.central = offset, rounds, fedavg, central
        self.started = time.time()
        self.latest = ArrayRecord(model.state_dict())  # the global model as of the last round recorded

    def write_history(self) -> None:
        with atomic_output(self.out / "history.json") as tmp:
            Path(tmp).write_text(json.dumps({"run_config": self.run_config, "rounds": self.rounds}, indent=1))

    def after_round(self, server_round: int, arrays: ArrayRecord) -> None:
        if server_round == 0:
            return None
        self.latest = arrays
        r = self.offset + server_round
        train = self.fedavg.train_log.get(server_round)
        if train is None:  # Flower's central-DP wrapper skips aggregation (and us) when a site sent an error
            train = {
                "sites": {},
                "dropped": [],
                "sites_trained": 0,
                "note": "central-DP wrapper skipped aggregation: a site replied with an error",
            }
        sites = {k: dict(v) for k, v in train["sites"].items()}
        evals = self.fedavg.eval_log.get(server_round, {})
        for key, e in evals.items():
            sites.setdefault(key, {})["eval"] = e
        for s in sites.values():
            s["released"] = [
                k
                for k, present in (("train-loss", "train_loss" in s), ("eval", "psnr" in s.get("eval", {})))
                if present
            ]
        losses = [
            (s["train_loss"], s["num_examples"]) for s in sites.values() if "train_loss" in s and s["num_examples"]
        ]
        answered = [e for e in evals.values() if "psnr" in e]
        mean = (lambda k: sum(e[k] for e in answered) / len(answered)) if answered else (lambda k: None)
        self.rounds.append(
            {
                "round": r,
                "train_loss": sum(x * w for x, w in losses) / sum(w for _, w in losses) if losses else None,
                "psnr": mean("psnr"),
                "ms_ssim": mean("ms_ssim"),
                "bpp": mean("bpp"),
                "epsilon_max": max((s["epsilon"] for s in sites.values() if "epsilon" in s), default=0.0),
                "delta": self.rc.delta,
                "sites_trained": train["sites_trained"],
                # No site trained: Flower keeps the previous global model, and so does the checkpoint below.
                "kept_previous_model": train["sites_trained"] == 0,
                "sites": sites,
                "dropped": train["dropped"],
                "wall_seconds": round(time.time() - self.started, 1),
                **({"note": train["note"]} if "note" in train else {}),
                **({"secure_aggregation": train["secure_aggregation"]} if "secure_aggregation" in train else {}),
            }
        )
        if self.central is not None:  # site-level rounds so far, earlier runs resumed from included
            self.rounds[-1]["central_dp"] = self.central.round_record(
                sum(1 for x in self.rounds if "central_dp" in x) + 1, self.fedavg.clipping_norms.get(server_round)
            )
        self.write_history()
        save_model(
            self.out / f"round_{r:03d}.safetensors",
            self.global_model(),
            {"round": r, "run_config": self.run_config, "epsilon_max": self.rounds[-1]["epsilon_max"]},
        )
        return None

    def global_model(self) -> FedlvcCodec:
        model = FedlvcCodec(self.model.cfg)
        model.load_state_dict(self.latest.to_torch_state_dict())
        return model


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = RunConfig.from_mapping(context.run_config)
    out = rc.resolved_out_dir()
    out.mkdir(parents=True, exist_ok=True)
    model, offset, rounds = _initial_model(rc)
    ledgers = earlier_ledgers(_history_rounds(rc), rc)
    if rc.privacy_unit == "segment":
        model = with_temporal_prior(model)  # an intra-only starting model gains a P-frame prior to train
    if rc.train_parts == "adapters":
        model = with_adapters(model)  # identity adapters: the sites fine-tune only them
    model_config = json.dumps(model.cfg.to_dict())
    strategy, fedavg, central = make_strategy(rc)
    recorder = RoundRecorder(out, rc, context, model, offset, rounds, fedavg, central)
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=rc.num_server_rounds,
        timeout=rc.round_timeout,
        train_config=ConfigRecord(
            {"model-config": model_config, "central-dp": rc.central_dp, "earlier-ledgers": json.dumps(ledgers)}
        ),
        evaluate_config=ConfigRecord({"model-config": model_config}),
        evaluate_fn=recorder.after_round,
    )
    final = recorder.global_model()  # the last model a round kept (rounds where nobody trained keep it)
    save_model(
        out / "final.safetensors",
        final,
        {"round": offset + rc.num_server_rounds, "run_config": dict(context.run_config)},
    )
    compressed = final_compression(grid, rc, final, fedavg)
    gains = gain_over_public(grid, rc, final, public_model(rc), fedavg)
    last = rounds[-1] if rounds else {"sites": {}}
    summary = {
        "rounds": offset + rc.num_server_rounds,
        "sites": {
            k: {
                "node_id": fedavg.registry.node_of(k),  # what names a site: a label is only what it claimed first
                **{f: last["sites"].get(k, {}).get(f) for f in ("epsilon", "delta", "accountant", "units")},
                **v,
                "gain_over_public": gains.get(k, {}).get("federated"),
                **({"gain_over_public_personal": gains.get(k, {}).get("personal")} if rc.personal_steps else {}),
                "releases": releases(rounds, k, v, gains.get(k)),
            }
            for k, v in sorted(compressed.items())
        },
    }
    with atomic_output(out / "summary.json") as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=1))
    print(summary_table(summary, out))


def releases(rounds: list, site: str, compressed: dict, gain: dict | None) -> dict:
    """How many non-DP numbers of each kind the site released to this server in this run."""
    counts = {"train-loss": 0, "eval": 0, "rd": int(gain is not None), "compress-summary": int("bytes" in compressed)}
    for r in rounds:
        for kind in r.get("sites", {}).get(site, {}).get("released", []):
            counts[kind] += 1
    return counts


def _query(grid: Grid, rc: RunConfig, kind: str, records: dict, config: dict, fedavg: SiteFedAvg, check) -> dict:
    """Send a query to every site, for the last round it was asked to train in (a site answers a query for
    its latest training round only); {site: check(reply)} or {site: {"refused" | "dropped": why}}."""
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
    return _query(
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
    curves = _query(
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
        gains[site] = {name: _gain(c["public"], c[name], q, name) for name in ("federated", "personal") if name in c}
    return gains


def _gain(public: list, ours: list, q: int, name: str) -> dict:
    """A site's model (``name``: federated, or its personal one) against the public model on its held-out frames:
    BD-rate over every quality level, PSNR and bpp change at final-quality, both curves."""
    return {
        "bd_rate_percent": bd_rate(public, ours),
        "psnr_db": ours[q][1] - public[q][1],
        "bpp_ratio": ours[q][0] / public[q][0],
        "public": public,
        name: ours,
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
