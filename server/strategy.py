"""The server's aggregation: FedAvg over checked replies (``server.replies``), each update bounded, the weighted
mean or a robust rule, the SecAgg+ sum, and central (site-level) DP's record."""

from __future__ import annotations

import math

import numpy as np
from flwr.app import Array, ArrayRecord, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from common.config.fedconfig import RunConfig
from common.train.privacy import epsilon_from_history

from .replies import (
    BadReply,
    SiteRegistry,
    answers,
    checked_arrays,
    checked_eval_metrics,
    checked_train_metrics,
    clip_note,
)
from .secure import PROTOCOL, SecureRound, secure_round


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
