"""What the server keeps of a run: where it starts (``resume-from``, ``init-model`` or the shipped model), the
sites' earlier ledgers, and after every round ``history.json`` and the round's checkpoint."""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import ArrayRecord, Context

from common.checkpoint import load_model, read_meta, save_model
from common.config.fedconfig import RunConfig
from common.data.video import atomic_output
from common.net.model import FedlvcCodec
from common.train.privacy import check_privacy_unit

from .strategy import CentralDP, SiteFedAvg


def history_rounds(rc: RunConfig) -> list:
    """Every round of the ``history.json`` beside ``resume-from`` (none without it)."""
    history_file = Path(rc.resume_from).parent / "history.json" if rc.resume_from else None
    return json.loads(history_file.read_text())["rounds"] if history_file and history_file.is_file() else []


def initial_model(rc: RunConfig) -> tuple[FedlvcCodec, int, list]:
    """(model, rounds already done, earlier history) from resume-from, init-model or the shipped model."""
    if rc.resume_from:
        model = load_model(rc.resume_from)
        done = int(read_meta(rc.resume_from).get("round", 0))
        return model, done, [r for r in history_rounds(rc) if r["round"] <= done]
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
