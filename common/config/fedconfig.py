"""Typed run configuration of the federation: the one source of defaults for the ServerApp, the ClientApp
and the sweep. Keys are Flower run-config names (``num-server-rounds``...), a contract for scripts and docs;
each key's type, default, limits and help come from the option schema (:mod:`common.config.options`), and
``pyproject.toml``'s ``[tool.flwr.app.config]`` is checked against it (tests/test_federation.py).

Upper bounds matter too: a run config comes from whoever submits the run, and sizes in it decide what a site
allocates (the site checks its own memory limit again, ``client.policy``)."""

from __future__ import annotations

import os
from dataclasses import field, make_dataclass
from pathlib import Path

from common.errors import FedlvcError

from . import options as o
from .options import Option, PFrameRule

RUN_OPTIONS: tuple[Option, ...] = (
    Option("num-server-rounds", int, 3, "FedAvg rounds", 1, 100_000),
    Option("local-steps", int, 12, "DP-SGD steps per site per round", 1, 1_000_000),
    o.BATCH_SIZE,
    o.MAX_PHYSICAL_BATCH,
    o.CROP_SIZE,
    o.LEARNING_RATE,
    o.NOISE_MULTIPLIER.but(help="sigma; 0 = non-private (only sites whose policy allows it)"),
    Option("clip-only", bool, False, "with noise-multiplier 0: per-sample clipping without noise (a reference)"),
    o.MAX_GRAD_NORM,
    o.DELTA.but(help="delta; a site uses the smaller of this and its own"),
    Option(
        "epsilon-budget",
        float,
        10.0,
        "a site declines a round whose epsilon would pass this (or its own max-epsilon, whichever is smaller)",
        0,
        None,
        lo_open=True,
    ),
    o.ACCOUNTANT.but(
        help="rdp or prv: a site reports the larger of this accountant's epsilon and its own's; sites "
        "decline gdp; the server uses it for central DP"
    ),
    Option("init-model", str, "", "start model; '' = the shipped public model"),
    Option("resume-from", str, "", "a round_NNN.safetensors of an earlier run: continue from it"),
    Option("out-dir", str, "runs/default", "the server's checkpoints, history.json, summary.json"),
    Option("eval-quality", int, 4, "quality level of the federated evaluation", 1, 16),
    Option("eval-frames", int, 4, "held-out frames per site (never trained on)", 1, 1000),
    Option("final-quality", int, 4, "quality of each site's final compression", 1, 16),
    Option("site-max-frames", int, 5000, "a site trains on at most this many of its frames, drawn uniformly", 2, 10**6),
    Option("demo-frames", int, 96, "frames per generated clip of a simulated site", 2, 100_000),
    Option("demo-clips", int, 2, "generated clips per simulated site", 1, 1000),
    Option(
        "site-frames",
        int,
        0,
        "a simulated site of this many frames (clips of demo-frames), generated when a row is read and never "
        "held in memory; 0 = demo-clips clips held in memory",
        0,
        1_000_000,
    ),
    Option(
        "demo-photos",
        str,
        "",
        "a photo corpus folder (fedlvc public-data --fetch): simulated sites film its held-out photographs (a fixed "
        "or slowly panning camera, objects crossing, sensor noise) instead of generated scenes; '' = generated",
    ),
    Option("demo-site-offset", int, 100, "simulated site k shows the scenes of generated site k + offset", 0, 10**6),
    Option("demo-width", int, 160, "width of generated clips", 16, 4096),
    Option("demo-height", int, 120, "height of generated clips", 16, 4096),
    Option("min-sites", int, 2, "FedAvg's minimum sites", 1, 100_000),
    Option("round-timeout", float, 3600.0, "seconds the server waits for replies in a round", 0, 1e7, lo_open=True),
    o.GRAD_SAMPLE_MODE,
    Option(
        "central-dp",
        str,
        "off",
        "site-level DP-FedAvg: fixed or adaptive clipping",
        choices=("off", "fixed", "adaptive"),
    ),
    Option(
        "central-noise-multiplier",
        float,
        1.0,
        "z: noise std = z x clipping-norm / sites-per-round",
        0,
        None,
        lo_open=True,
    ),
    Option(
        "central-clipping-norm",
        float,
        1.0,
        "S: each site's model update is clipped to this L2 norm",
        0,
        None,
        lo_open=True,
    ),
    Option("central-sites", int, 0, "sites sampled per round under central DP (0: min-sites)", 0, 100_000),
    Option(
        "central-target-quantile",
        float,
        0.5,
        "adaptive: fraction of site updates the norm should leave unclipped",
        0,
        1,
        lo_open=True,
        hi_open=True,
    ),
    Option(
        "central-clip-lr", float, 0.2, "adaptive: geometric learning rate of the clipping norm", 0, None, lo_open=True
    ),
    Option(
        "central-count-stddev",
        float,
        0.0,
        "adaptive: noise on the clipped count (0: Flower's default, sites/20)",
        0,
        None,
    ),
    Option(
        "secure-aggregation",
        bool,
        False,
        "Flower's SecAgg+: the server sees only the sum of the sites' masked updates (each site that trains "
        "counts once); not with central-dp",
    ),
    Option(
        "secagg-threshold",
        float,
        0.5,
        "SecAgg+: fraction of a site's key shares needed to unmask (more: stronger against colluding sites, "
        "fewer dropouts survived)",
        0,
        1,
        lo_open=True,
    ),
    Option(
        "max-update-norm",
        float,
        # One honest site's first round measured 0.07 (the tiny test federation), 1.2 (the default), 0.5 (the
        # adapter studies), 2.7 (photo_sites, 60 steps) and 4.5 (privacy_quality_tuned: learning-rate 1e-3, 24
        # steps), the last three at their non-private settings (DP noise made them smaller): 100 touches none.
        100.0,
        "the server clips each site's update (its model - the global model) to this L2 norm, recording update_norm "
        "and clipped_to per site and round in history.json (an honest update stays below about learning-rate x "
        "local-steps x sqrt(parameters trained), 1.0 M in the shipped model); under secure-aggregation it bounds "
        "the revealed mean update instead; 0 = off",
        0,
        None,
    ),
    Option(
        "aggregation",
        str,
        "mean",
        "how the server combines the sites' models: mean (weighted by their example counts), or, against a "
        "minority of hostile sites, coordinate-wise median or trimmed-mean (each site counts once); not with "
        "secure-aggregation or central-dp",
        choices=("mean", "median", "trimmed-mean"),
    ),
    Option(
        "trim-fraction",
        float,
        0.2,
        "trimmed-mean: the fraction of sites cut from each end per coordinate (rounded down: with fewer than "
        "1/trim-fraction sites nothing is cut)",
        0,
        0.5,
        hi_open=True,
    ),
    o.PRIVACY_UNIT,
    o.SEGMENT_FRAMES,
    o.GOP.but(help="group-of-pictures length of the evaluation and the final compression (1 = intra-only)"),
    o.RD_WEIGHT,
    o.SKIP_THRESHOLD,
    o.TRAIN_PART,
    Option(
        "personal-steps",
        int,
        0,
        "steps of each site's personal fine-tuning of the final model (personal-parts) on its own frames, "
        "without noise, kept at the site and used for its final compression (0 = off)",
        0,
        100_000,
    ),
    Option(
        "personal-parts",
        str,
        "entropy",
        "what a site's personal fine-tuning moves: entropy (gains and priors), adapters (FiLM adapters, added "
        "when the model has none) or all",
        choices=("entropy", "adapters", "all"),
    ),
    Option(
        "personal-learning-rate",
        float,
        0.0,
        "Adam learning rate of each site's personal fine-tuning (0 = the run's learning-rate)",
        0,
        10,
    ),
    o.SEED,
)
_BY_NAME = {opt.name: opt for opt in RUN_OPTIONS}


class _RunConfigMethods:
    @classmethod
    def from_mapping(cls, mapping) -> RunConfig:
        """From Flower's ``context.run_config`` (or YAML): dashed keys, unknown keys are an error."""
        values = {}
        for key, value in dict(mapping).items():
            if key not in _BY_NAME:
                raise FedlvcError(f"unknown run-config key {key!r} (known: {', '.join(sorted(_BY_NAME))})")
            values[_BY_NAME[key].attr] = _BY_NAME[key].convert(value)
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Every key within its limits, and the combinations that make sense."""
        for opt in RUN_OPTIONS:
            opt.check(getattr(self, opt.attr))
        if self.clip_only and self.noise_multiplier > 0:
            raise FedlvcError("run-config key 'clip-only' needs noise-multiplier = 0")
        if self.train_parts in ("temporal", "motion") and self.privacy_unit != "segment":
            raise FedlvcError(f"run-config key 'train-parts' {self.train_parts} needs privacy-unit = segment")
        if self.secure_aggregation and self.central_dp != "off":
            raise FedlvcError(
                "run-config key 'secure-aggregation' cannot be combined with central-dp: the server would have "
                "to clip each site's update, which it no longer sees"
            )
        if self.aggregation != "mean" and (self.secure_aggregation or self.central_dp != "off"):
            raise FedlvcError(
                f"run-config key 'aggregation' {self.aggregation} cannot be combined with secure-aggregation or "
                "central-dp: the server would need each site's update (SecAgg+ reveals only their sum), and central "
                "DP's noise is calibrated to a mean"
            )
        if self.secure_aggregation and self.min_sites < 2:
            raise FedlvcError("run-config key 'secure-aggregation' needs min-sites >= 2 (a sum of one is the update)")

    @property
    def row_frames(self) -> int:
        """Frames per training row as the training loop takes it: 0 (frame rows) or segment-frames."""
        return self.segment_frames if self.privacy_unit == "segment" else 0

    @property
    def unit_frames(self) -> int:
        """Frames per privacy unit (a training row): 1, or segment-frames."""
        return self.segment_frames if self.privacy_unit == "segment" else 1

    @property
    def p_rule(self) -> PFrameRule:
        return PFrameRule.of(self.rd_weight, self.skip_threshold)

    @property
    def streamed_sites(self) -> bool:
        """Whether simulated sites are streamed on demand (``site-frames`` or ``demo-photos``; common.data.sites)."""
        return bool(self.site_frames or self.demo_photos)

    @property
    def private(self) -> bool:
        return self.noise_multiplier > 0

    def resolved_out_dir(self) -> Path:
        return Path(os.path.expanduser(self.out_dir)).resolve()


RunConfig = make_dataclass(
    "RunConfig",
    [(opt.attr, opt.kind, field(default=opt.default)) for opt in RUN_OPTIONS],
    bases=(_RunConfigMethods,),
    frozen=True,
)
RunConfig.__module__ = __name__
RunConfig.__doc__ = (
    "A federated run's settings (Flower's run config), one field per option of RUN_OPTIONS: "
    + "; ".join(f"{opt.name} ({opt.default!r}): {opt.help}" for opt in RUN_OPTIONS)
)
