"""The fedlvc Flower ServerApp: the wiring of a run. The aggregation (FedAvg over checked replies, update bounds,
robust rules, SecAgg+, central DP) is in :mod:`server.strategy`, what is kept of each round in
:mod:`server.recorder`, the final queries and the summary in :mod:`server.queries`."""

from __future__ import annotations

import json

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
)

from common.checkpoint import save_model
from common.config.fedconfig import RunConfig
from common.data.video import atomic_output
from common.net.model import with_adapters, with_temporal_prior

from .queries import final_compression, gain_over_public, public_model, summary, summary_table
from .recorder import RoundRecorder, earlier_ledgers, history_rounds, initial_model
from .strategy import CentralDP, SiteFedAvg

app = ServerApp()


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


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = RunConfig.from_mapping(context.run_config)
    out = rc.resolved_out_dir()
    out.mkdir(parents=True, exist_ok=True)
    model, offset, rounds = initial_model(rc)
    ledgers = earlier_ledgers(history_rounds(rc), rc)
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
    result = summary(rc, offset, rounds, compressed, gains, fedavg.registry)
    with atomic_output(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    print(summary_table(result, out))
