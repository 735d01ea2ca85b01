"""Typed run configuration of the federation: the one source of defaults for the ServerApp, the ClientApp
and the sweep. Keys are Flower run-config names (``num-server-rounds``...), a contract for scripts and docs."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from .errors import FedlvcError


@dataclass(frozen=True)
class RunConfig:
    num_server_rounds: int = 3
    local_steps: int = 12  # DP-SGD steps per site per round
    batch_size: int = 16  # expected (Poisson) batch size; sampling rate q = batch-size / frames at the site
    crop_size: int = 64  # pixels, a multiple of 16
    learning_rate: float = 3e-4
    noise_multiplier: float = 1.0  # σ; 0 = non-private (no noise; no clipping unless clip-only)
    clip_only: bool = False  # with noise-multiplier 0: per-sample clipping without noise (a reference, ε = ∞)
    max_grad_norm: float = 1.0  # C
    delta: float = 1e-5
    epsilon_budget: float = 10.0  # a site stops training before its ε would pass this
    accountant: str = "rdp"
    init_model: str = ""  # "" = the shipped public model
    resume_from: str = ""  # a round checkpoint (.safetensors) of an earlier run: continue its numbering
    out_dir: str = "runs/default"
    eval_quality: int = 4  # quality level used by the federated evaluation
    eval_frames: int = 4  # held-out frames per site used by the federated evaluation
    final_quality: int = 4  # quality of each site's final compression
    site_max_frames: int = 5000  # a site trains on at most this many of its frames, drawn uniformly (memory bound)
    demo_frames: int = 96  # frames per generated clip when a site has no video-dir (simulation)
    demo_clips: int = 2
    demo_site_offset: int = 100  # site k generates the scenes of generator site k + offset (the shipped model trained on 0-3)
    demo_width: int = 160
    demo_height: int = 120
    min_sites: int = 2  # FedAvg's min train / evaluate / available nodes
    round_timeout: float = 3600.0  # seconds the server waits for replies in a round
    grad_sample_mode: str = "hooks"
    central_dp: str = "off"  # "fixed": site-level DP-FedAvg (Flower's client-side fixed clipping + server noise)
    central_noise_multiplier: float = 1.0  # z: noise std = z · clipping-norm / sites-per-round
    central_clipping_norm: float = 1.0  # S: each site's model update is clipped to this L2 norm
    central_sites: int = 0  # sites sampled per round under central DP (0: min-sites)
    central_target_quantile: float = 0.5  # adaptive: fraction of site updates the norm should leave unclipped
    central_clip_lr: float = 0.2  # adaptive: geometric learning rate of the clipping norm
    central_count_stddev: float = 0.0  # adaptive: noise on the clipped count (0: Flower's default, sites / 20)
    privacy_unit: str = "frame"  # frame: one DP row = one frame (I-frame training) | segment: S consecutive frames
    segment_frames: int = 4  # S, frames per segment when privacy-unit = segment (I+P training)
    gop: int = 32  # group-of-pictures length of the evaluation and the final compression (1 = intra-only)
    rd_weight: float = 1.0  # encoder P-frame rule (evaluation, final compression, segment training): RDO weight,
    skip_threshold: float = 0.2  # or with rd-weight 0, rounding with this skip threshold (common.model.PFrameRule)
    train_parts: str = "all"  # all | entropy: sites fine-tune only the gains and priors (fewer coordinates under DP)
    seed: int = 0
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, mapping) -> "RunConfig":
        """From Flower's ``context.run_config`` (or YAML): dashed keys, unknown keys are an error."""
        names = {f.name.replace("_", "-"): f for f in fields(cls) if f.name != "extra"}
        values = {}
        for key, value in dict(mapping).items():
            if key not in names:
                raise FedlvcError(f"unknown run-config key {key!r} (known: {', '.join(sorted(names))})")
            f = names[key]
            typ = {"int": int, "float": float, "str": str, "bool": bool}[
                f.type if isinstance(f.type, str) else f.type.__name__]
            try:
                if typ is int and isinstance(value, float) and not value.is_integer():
                    raise ValueError
                if typ is bool:
                    if isinstance(value, str) and value.lower() in ("true", "false"):
                        value = value.lower() == "true"
                    if not isinstance(value, bool):
                        raise ValueError
                if typ in (int, float) and isinstance(value, bool):
                    raise ValueError
                values[f.name] = typ(value)
            except (TypeError, ValueError):
                raise FedlvcError(f"run-config key {key!r} must be {typ.__name__}, got {value!r}") from None
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def need(cond, key, what):
            if not cond:
                raise FedlvcError(f"run-config key {key!r} {what}")

        def within(key, lo, hi):
            value = getattr(self, key.replace("-", "_"))
            need(lo <= value <= hi, key, f"must be in {lo}..{hi}")  # also refuses nan

        # Upper bounds too: a run config comes from whoever submits the run, and sizes in it decide what a
        # site allocates (the site's own memory limit is checked again at the site, client.policy).
        within("num-server-rounds", 1, 100_000)
        within("local-steps", 1, 1_000_000)
        within("batch-size", 1, 4096)
        need(self.crop_size % 16 == 0, "crop-size", "must be a positive multiple of 16")
        within("crop-size", 16, 512)
        need(0 < self.learning_rate <= 10, "learning-rate", "must be in (0, 10]")
        need(0 <= self.noise_multiplier <= 1e6, "noise-multiplier", "must be in [0, 1e6]")
        need(0 < self.max_grad_norm <= 1e6, "max-grad-norm", "must be in (0, 1e6]")
        need(0 < self.delta < 1, "delta", "must be in (0, 1)")
        need(self.epsilon_budget > 0, "epsilon-budget", "must be > 0")
        need(self.accountant in ("rdp", "prv", "gdp"), "accountant", "must be rdp, prv or gdp")
        within("min-sites", 1, 100_000)
        need(0 < self.round_timeout <= 1e7, "round-timeout", "must be in (0, 1e7] seconds")
        within("site-max-frames", 2, 1_000_000)
        within("eval-frames", 1, 1000)
        within("eval-quality", 1, 16)
        within("final-quality", 1, 16)
        within("demo-frames", 2, 100_000)
        within("demo-clips", 1, 1000)
        within("demo-width", 16, 4096)
        within("demo-height", 16, 4096)
        within("demo-site-offset", 0, 1_000_000)
        need(not (self.clip_only and self.noise_multiplier > 0), "clip-only", "needs noise-multiplier = 0")
        need(self.central_dp in ("off", "fixed", "adaptive"), "central-dp", "must be off, fixed or adaptive")
        need(0 < self.central_target_quantile < 1, "central-target-quantile", "must be in (0, 1)")
        need(self.central_clip_lr > 0, "central-clip-lr", "must be > 0")
        need(self.central_count_stddev >= 0, "central-count-stddev", "must be >= 0")
        need(self.central_noise_multiplier > 0, "central-noise-multiplier", "must be > 0")
        need(self.central_clipping_norm > 0, "central-clipping-norm", "must be > 0")
        need(self.central_sites >= 0, "central-sites", "must be >= 0")
        need(self.privacy_unit in ("frame", "segment"), "privacy-unit", "must be frame or segment")
        within("segment-frames", 2, 64)
        need(1 <= self.gop <= 65535, "gop", "must be in 1..65535")
        need(0 <= self.skip_threshold < 10, "skip-threshold", "must be in [0, 10)")
        need(0 <= self.rd_weight <= 1000, "rd-weight", "must be in [0, 1000]")
        need(self.train_parts in ("all", "entropy"), "train-parts", "must be all or entropy")

    @property
    def unit_frames(self) -> int:
        """Frames per privacy unit (a training row): 1, or segment-frames."""
        return self.segment_frames if self.privacy_unit == "segment" else 1

    @property
    def p_rule(self):
        from .model import PFrameRule

        return PFrameRule.of(self.rd_weight, self.skip_threshold)

    @property
    def private(self) -> bool:
        return self.noise_multiplier > 0

    def resolved_out_dir(self) -> Path:
        return Path(os.path.expanduser(self.out_dir)).resolve()
