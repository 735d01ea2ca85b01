"""Single-site training of the codec (non-private or DP-SGD), resumable, keeping the best checkpoint
by validation rate–distortion loss rather than the last one (training can diverge late)."""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, field, make_dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from common.checkpoint import load_model, read_meta, save_model
from common.config.options import TRAIN_OPTIONS, TRAIN_PARTS, PFrameRule, check_fields
from common.data.clips import FrameCrops, SegmentCrops, find_videos, load_clips, make_segments
from common.data.video import atomic_output
from common.errors import FedlvcError
from common.net.architecture import CodecConfig
from common.net.model import FedlvcCodec, with_adapters, with_motion, with_temporal_prior
from common.train.segments import forward_segment

from .losses import RateDistortion, SegmentRateDistortion
from .privacy import (
    DPConfig,
    epsilon_from_history,
    fold_segment_grad_samples,
    layout_safe_samples,
    make_private,
    poisson_sample_rate,
)


class _TrainConfigMethods:
    def __post_init__(self):
        check_fields(self, TRAIN_OPTIONS, "training setting")
        if self.segment_frames == 1:
            raise FedlvcError("training setting 'segment-frames' must be 0 (frame rows) or at least 2")
        if self.compile and self.segment_frames:
            raise FedlvcError("training setting 'compile' is for frame rows (a segment's forward runs the encoder)")

    @property
    def p_rule(self) -> PFrameRule:
        return PFrameRule.of(self.rd_weight, self.skip_threshold)

    @property
    def row_frames(self) -> int:
        """Frames per training row: 0 (frame rows) or S (segments)."""
        return self.segment_frames


TrainConfig = make_dataclass(
    "TrainConfig",
    [(opt.attr, opt.kind, field(default=opt.default)) for opt in TRAIN_OPTIONS],
    bases=(_TrainConfigMethods,),
)
TrainConfig.__module__ = __name__
TrainConfig.__doc__ = "Single-site training settings, one field per option of TRAIN_OPTIONS."


ENTROPY_MODULES = (
    "gain.",
    "inv_gain.",
    "prior.",
    "temporal.",
    "z_prior.",
    "h_a.",
    "h_s.",
    "res_gain.",
    "res_inv_gain.",
    "res_prior.",
)
RESIDUAL_MODULES = ("res_",)  # a motion model's residual codec (common.motion.residual)


def set_trainable(model: FedlvcCodec, segment_frames: int, parts: str = "all") -> list:
    """Freeze what this kind of training cannot reach or should not touch; return the trainable parameters.

    Frame rows train the intra path (the temporal prior is frozen: no loss term reaches it); segment rows
    train everything. ``parts="entropy"`` keeps only the quantization gains and the priors (0.7 % of the
    shipped model's parameters with frame rows, 3 % with segments: under DP the same noise per coordinate
    meets a clipped gradient spread over far fewer coordinates); ``parts="temporal"`` only the P-frame prior
    (segments); ``parts="motion"`` only a motion model's residual codec (segments: its P-frames)."""
    if parts not in TRAIN_PARTS:
        raise FedlvcError(f"train parts must be one of {', '.join(TRAIN_PARTS)}, not {parts!r}")
    if parts == "temporal" and not segment_frames:
        raise FedlvcError("training only the temporal prior needs segments (segment frames >= 2)")
    if parts == "motion" and not (segment_frames and model.cfg.motion):
        raise FedlvcError("training only the motion parts needs a motion model (--motion) and segments")
    if parts == "adapters" and not model.cfg.adapters:
        raise FedlvcError("training only the adapters needs a model with adapters (common.net.model.with_adapters)")
    for name, p in model.named_parameters():
        temporal = name.startswith("temporal.")
        residual = name.startswith(RESIDUAL_MODULES)
        # a motion model's P-frames never use the latent P-frame prior; frame rows reach neither
        reachable = bool(segment_frames) and not (temporal and model.cfg.motion) or not (temporal or residual)
        if parts == "temporal":
            p.requires_grad_(temporal)
        elif parts == "motion":
            p.requires_grad_(residual)
        elif parts == "adapters":
            p.requires_grad_(".film." in name)
        elif parts == "entropy":
            p.requires_grad_(reachable and name.startswith(ENTROPY_MODULES))
        else:
            p.requires_grad_(reachable)
    return [p for p in model.parameters() if p.requires_grad]


# Training the motion parts alone moves a residual prior table (raw Laplace scales) and per-level log-gains
# (Embeddings) besides two transforms: Adam at a transform's rate would take tens of thousands of steps to move
# a table or a gain as far as the P-frame prior's own stage did at 0.01, so they take this many times the rate.
MOTION_TABLE_LR_SCALE = 100.0
MOTION_TABLES = ("res_prior.", "res_gain.", "res_inv_gain.")


def param_groups(model: FedlvcCodec, parts: str, lr: float) -> list[dict]:
    """Adam's parameter groups of the trainable parameters, each with its ``scale`` of the learning rate: 1, but
    MOTION_TABLE_LR_SCALE for the residual prior and gains when only the motion parts train."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    fast = [p for n, p in named if parts == "motion" and n.startswith(MOTION_TABLES)]
    rest = [p for n, p in named if not (parts == "motion" and n.startswith(MOTION_TABLES))]
    groups = [{"params": rest, "lr": lr, "scale": 1.0}]
    if fast:
        groups.append({"params": fast, "lr": lr * MOTION_TABLE_LR_SCALE, "scale": MOTION_TABLE_LR_SCALE})
    return groups


def rows_dataset(
    rows: list, crop: int, num_levels: int, segment_frames: int, seed: int, rule: PFrameRule = PFrameRule()
):
    """(dataset, loss function, forward) for frame rows or segment rows (P-frames chosen by ``rule``)."""
    if segment_frames:
        return (
            SegmentCrops(rows, crop, num_levels, seed=seed),
            SegmentRateDistortion,
            lambda m, x, lv: forward_segment(m, x, lv, rule),
        )
    return FrameCrops(rows, crop, num_levels, seed=seed), RateDistortion, lambda m, x, lv: m(x, lv)


def empty_batch_step(model, optimizer) -> None:
    """An empty Poisson batch is still a DP-SGD step (the accountant counts it): zero per-sample
    gradients, so the update is the Gaussian noise alone."""
    for p in model.parameters():
        if p.requires_grad:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()


def _backward(per_sample: torch.Tensor) -> None:
    with warnings.catch_warnings():
        # Opacus' full backward hooks on the first layer, whose input (the frames) needs no gradient: harmless
        # (tests/test_dp_grad_samples.py checks every per-sample gradient), but torch warns each step.
        warnings.filterwarnings(
            "ignore", message="Full backward hook is firing when gradients are computed with respect to module outputs"
        )
        per_sample.mean().backward()


MAX_NONFINITE_IN_A_ROW = 20  # steps without DP whose loss is not finite, one after the other: diverged


class Trainer:
    """The one training loop: single-site training (:func:`train`) and a federated site's round
    (:func:`local_train`) take the same steps.

    A step: a batch of crops of frame rows (or segment rows), the rate–distortion loss, backward, then
    gradient-norm clipping (no DP) or Opacus' per-sample clipping and Gaussian noise (DP; a segment row's
    per-frame gradient samples summed first). Opacus hooks the model itself (``wrap_model=False``) and is
    removed by :meth:`close`. An empty Poisson batch is a step of noise alone.

    Failure policy: a sample whose loss is not finite never moves the model. Without DP that batch's step is
    skipped, and after ``MAX_NONFINITE_IN_A_ROW`` such steps in a row the run stops with an error (diverged).
    Under DP a sample whose loss or per-sample gradient is not finite has its gradient zeroed before clipping (a
    per-sample operation, like clipping, so the guarantee holds) and the step, its noise and the accountant go
    on; the run never stops on it: whether and how long a run trains never depends on the data, and a run that
    diverges shows it in its noised model. Such steps are counted (``nonfinite_steps``, never released)."""

    def __init__(
        self,
        model: FedlvcCodec,
        rows: list,
        cfg,
        *,
        dp: DPConfig | None = None,
        history=None,
        seed: int | None = None,
        device: str | torch.device = "cpu",
        fast_layout: bool = False,
        restore=None,
    ):
        """``cfg``: a :class:`TrainConfig` or a federated ``RunConfig`` (crop_size, batch_size, learning_rate,
        row_frames, train_parts, p_rule, seed and, single-site, clip_norm). ``seed``: of the crops, when not
        ``cfg.seed``. ``fast_layout``: channels_last activations (faster on a CPU; under DP only where every
        module Opacus samples is indifferent to the layout, :func:`common.train.privacy.layout_safe_samples`: the
        model's own module types are). ``restore(model, optimizer)`` loads a saved state before Opacus
        wraps."""
        self.model, self.device, self.dp = model.to(device).train(), device, dp
        self.clip_norm = getattr(cfg, "clip_norm", 1.0)  # federated rounds: 1, as always
        self.max_physical_batch = cfg.max_physical_batch
        seed = cfg.seed if seed is None else seed
        dataset, loss_cls, self.forward = rows_dataset(
            rows, cfg.crop_size, model.cfg.num_levels, cfg.row_frames, seed, cfg.p_rule
        )
        self.sample_rate = poisson_sample_rate(len(dataset), cfg.batch_size)
        self.params = set_trainable(self.model, cfg.row_frames, cfg.train_parts)
        self.fast_layout = fast_layout and (dp is None or layout_safe_samples(self.model, dp.grad_sample_mode))
        if self.fast_layout:
            self.model = self.model.to(memory_format=torch.channels_last)
        if getattr(cfg, "compile", False):  # single-site only (TrainConfig): frame rows, no DP (checked there)
            compiled, forward = torch.compile(self.model), self.forward
            self.forward = lambda m, x, lv: forward(compiled, x, lv)
        self.optimizer = torch.optim.Adam(param_groups(self.model, cfg.train_parts, cfg.learning_rate))
        self.restored = restore(self.model, self.optimizer) if restore else None
        self.loss_fn = loss_cls(model.cfg.lambdas)
        self.engine = self.hooks = None
        if dp is None:  # every epoch yields a batch, however few the rows
            batch = min(cfg.batch_size, len(dataset))
            self.loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True)
        else:
            self.engine, self.hooks, self.optimizer, self.loader = make_private(
                self.model, self.optimizer, DataLoader(dataset, batch_size=cfg.batch_size), dp, history
            )
        self.nonfinite_steps, self._in_a_row = 0, 0

    @property
    def history(self) -> list:
        """The accountant's history ``[(σ, q, steps), ...]`` (empty without DP)."""
        return [tuple(h) for h in self.engine.accountant.history] if self.engine is not None else []

    def batches(self, steps: int):
        """``steps`` batches, epoch after epoch."""
        done = 0
        while done < steps:
            for batch in self.loader:
                if done >= steps:
                    return
                done += 1
                yield batch

    def step(self, x: torch.Tensor, levels: torch.Tensor, lr: float | None = None) -> float:
        """One optimizer step on (x, levels); the mean loss of its finite samples (nan: none, or an empty
        Poisson batch)."""
        if lr is not None:
            for g in self.optimizer.param_groups:
                g["lr"] = lr * g["scale"]
        x, levels = x.to(self.device), levels.to(self.device)
        if self.fast_layout and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        self.optimizer.zero_grad(set_to_none=True)
        if x.shape[0] == 0:
            empty_batch_step(self.model, self.optimizer)
            self.model.project_()
            return float("nan")
        if self.dp is not None:
            return self._dp_step(x, levels)
        per_sample = self.loss_fn(self.forward(self.model, x, levels), x, levels)
        if not self._count_finite(bool(torch.isfinite(per_sample).all())):
            return float("nan")
        _backward(per_sample)
        torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm)
        self.optimizer.step()
        self.model.project_()
        return per_sample.mean().item()

    def _dp_step(self, x: torch.Tensor, levels: torch.Tensor) -> float:
        """One DP-SGD step on a Poisson batch, in pieces of at most ``max-physical-batch`` rows: each piece's
        per-sample gradients are clipped and summed by Opacus (``signal_skip_step``), the last piece adds the
        noise once and takes the one accounted step. A sample whose loss or per-sample gradient is not finite
        contributes a zero gradient."""
        size = self.max_physical_batch or x.shape[0]
        pieces = [slice(i, i + size) for i in range(0, x.shape[0], size)]
        losses, all_finite = [], True
        for i, rows in enumerate(pieces):
            if i:
                self.optimizer.zero_grad(set_to_none=True)  # the summed clipped gradients are kept
            xs, ls = x[rows], levels[rows]
            per_sample = self.loss_fn(self.forward(self.model, xs, ls), xs, ls)
            finite = torch.isfinite(per_sample)
            _backward(torch.where(finite, per_sample, torch.zeros_like(per_sample)))
            if xs.dim() == 5:
                fold_segment_grad_samples(self.model, xs.shape[0], xs.shape[1])
            finite &= self._finite_grad_samples()  # a finite loss can still have an inf gradient: NaN once clipped
            all_finite &= bool(finite.all())
            if not finite.all():
                for p in self.params:
                    p.grad_sample[~finite] = 0
            losses.append(per_sample[finite].detach())
            self.optimizer.signal_skip_step(do_skip=i < len(pieces) - 1)
            self.optimizer.step()
        self._count_finite(all_finite)
        self.model.project_()
        kept = torch.cat(losses)
        return kept.mean().item() if kept.numel() else float("nan")

    def _finite_grad_samples(self) -> torch.Tensor:
        """(rows,) bool: the rows (privacy units) whose per-sample gradient is finite in every trainable parameter."""
        rows = [torch.isfinite(p.grad_sample).flatten(1).all(1) for p in self.params]
        return torch.stack(rows).all(0)

    def _count_finite(self, all_finite: bool) -> bool:
        if all_finite:
            self._in_a_row = 0
            return True
        self.nonfinite_steps += 1
        self._in_a_row += 1
        # Under DP stopping would tell the server that some unit makes the loss overflow: outside what ε accounts.
        if self.dp is None and self._in_a_row >= MAX_NONFINITE_IN_A_ROW:
            raise FedlvcError(f"training diverged: {self._in_a_row} steps in a row had a loss that is not finite")
        return False

    def close(self) -> FedlvcCodec:
        """Remove Opacus' hooks (the model can be made private again next round); every parameter trainable."""
        if self.hooks is not None:
            self.hooks.cleanup()
            self.hooks = None
        for p in self.model.parameters():
            p.requires_grad_(True)
        return self.model


class WeightAverage:
    """An exponential moving average of a model's floating-point weights (Polyak averaging): after each step
    ``average ← average + (1 − decay)·(weights − average)``. Validation and checkpoints use the average
    (:meth:`applied`), training goes on with the weights themselves. A convex combination, so GDN's weights stay
    non-negative."""

    def __init__(self, model: FedlvcCodec, decay: float, saved: dict | None = None):
        self.decay = decay
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
        for k, v in (saved or {}).items():  # a resumed run's average
            self.average[k].copy_(v)

    @torch.no_grad()
    def update(self, model: FedlvcCodec) -> None:
        for k, v in model.state_dict().items():
            if k in self.average:
                self.average[k].lerp_(v, 1.0 - self.decay)

    @contextmanager
    def applied(self, model: FedlvcCodec):
        """The model holds the averaged weights inside the block, its own ones again after it."""
        own = {k: v.detach().clone() for k, v in model.state_dict().items() if k in self.average}
        model.load_state_dict(self.average, strict=False)
        try:
            yield model
        finally:
            model.load_state_dict(own, strict=False)


def _validation_crops(rows: list, size: int, limit: int = 48) -> torch.Tensor:
    """Centre crops (N, 3, s, s) of frame rows, or (N, S, 3, s, s) of segment rows."""
    if rows and isinstance(rows[0], list):
        per = [_validation_crops(seg, size, limit=len(seg)) for seg in rows[: max(1, limit // len(rows[0]))]]
        s = min(p.shape[-1] for p in per)
        return torch.stack([p[..., :s, :s] for p in per])
    crops = []
    for f in rows[:limit]:
        h, w = f.shape[:2]
        s = min(size, h // 16 * 16, w // 16 * 16)
        y, x = (h - s) // 2, (w - s) // 2
        crops.append(torch.from_numpy(np.ascontiguousarray(f[y : y + s, x : x + s])).permute(2, 0, 1).float() / 255)
    s = min(c.shape[-1] for c in crops)
    return torch.stack([c[:, :s, :s] for c in crops])


@torch.no_grad()
def validation_loss(model: FedlvcCodec, crops: torch.Tensor, rule: PFrameRule = PFrameRule()) -> dict:
    """Mean RD loss over every quality level with real rounding (eval mode), plus bpp/PSNR per level."""
    was_training = model.training
    model.eval()
    segments = crops.dim() == 5
    loss_fn = (SegmentRateDistortion if segments else RateDistortion)(model.cfg.lambdas)
    total, per_level = 0.0, []
    for q in range(model.cfg.num_levels):
        levels = torch.full((crops.shape[0],), q, dtype=torch.long, device=crops.device)
        out = forward_segment(model, crops, levels, rule) if segments else model(crops, levels)
        out["x_hat"] = out["x_hat"].clamp(0, 1)
        total += loss_fn(out, crops, levels).mean().item()
        mse = loss_fn.terms["mse"].mean().item()
        per_level.append({"bpp": loss_fn.terms["bpp"].mean().item(), "psnr": 10 * math.log10(1 / max(mse, 1e-12))})
    model.train(was_training)
    return {"loss": total / model.cfg.num_levels, "levels": per_level}


def _state_paths(out: Path):
    stem = out.with_suffix("")
    return Path(f"{stem}.train-state.safetensors"), Path(f"{stem}.train-state.json")


def _save_state(out: Path, model, optimizer, info: dict, average: WeightAverage | None = None) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v.cpu().contiguous() for k, v in (average.average if average else {}).items()})
    for i, st in optimizer.state_dict()["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{i}.{k}"] = v.detach().cpu().contiguous().reshape(v.shape)
    tpath, jpath = _state_paths(out)
    with atomic_output(tpath) as tmp:
        save_file(tensors, str(tmp))
    with atomic_output(jpath) as tmp:
        tmp.write_text(json.dumps(info, indent=2))


def _read_info(out: Path) -> dict | None:
    """The saved training state's JSON (steps, best validation, DP history), or None to start afresh."""
    tpath, jpath = _state_paths(out)
    return json.loads(jpath.read_text()) if tpath.is_file() and jpath.is_file() else None


def _saved_average(out: Path) -> dict:
    """The weight average of a saved training state ({} when it has none)."""
    tensors = load_file(str(_state_paths(out)[0]))
    return {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}


def _load_tensors(out: Path, model, optimizer) -> None:
    tensors = load_file(str(_state_paths(out)[0]))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt_state = optimizer.state_dict()
    for i in (i for group in opt_state["param_groups"] for i in group["params"]):
        st = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
        if st:
            opt_state["state"][i] = st
    optimizer.load_state_dict(opt_state)


def _training_rows(video_dirs, cfg: TrainConfig) -> tuple[list, list, list]:
    """(video paths, training rows, held-out rows: every 20th) of the videos, frames or segments."""
    paths = find_videos(video_dirs)
    clips = load_clips(paths, cfg.every, cfg.max_frames_per_video)
    rows = make_segments(clips, cfg.segment_frames) if cfg.segment_frames else [f for c in clips for f in c]
    if not rows:
        raise FedlvcError(f"the videos hold no segment of {cfg.segment_frames} consecutive frames")
    return paths, [f for i, f in enumerate(rows) if i % 20] or rows, rows[::20]


class _Checkpoints:
    """Validation, logging and checkpoints of a single-site run (:func:`train`): the best model by validation
    RD loss without DP, the last one under DP (every step is spent privacy), and the resumable state."""

    def __init__(
        self,
        out: Path,
        trainer: Trainer,
        cfg: TrainConfig,
        dp: DPConfig | None,
        info: dict,
        meta: dict,
        val_crops: torch.Tensor,
        log,
    ):
        self.out, self.trainer, self.cfg, self.dp, self.info, self.meta = out, trainer, cfg, dp, info, meta
        self.val_crops, self.log = val_crops.to(trainer.device), log
        saved = _saved_average(out) if info["step"] else {}
        self.average = WeightAverage(trainer.model, cfg.ema, saved) if cfg.ema else None
        self.before = meta["trained_before"]
        self.started, self.last = time.time() - info["wall_seconds"], time.time()
        self.nonfinite_before = info.get("nonfinite_steps", 0)

    def epsilon(self) -> float | None:
        if self.dp is None:
            return None
        return (
            epsilon_from_history(self.trainer.history, self.dp.delta, self.dp.accountant)
            if self.dp.noise_multiplier > 0
            else float("inf")
        )

    def due(self) -> bool:
        step = self.info["step"]
        return (
            step % self.cfg.validate_every == 0
            or step == self.cfg.steps
            or time.time() - self.last > self.cfg.checkpoint_seconds
        )

    def step_done(self) -> None:
        if self.average is not None:
            self.average.update(self.trainer.model)

    def save(self, running: list, lr: float | None) -> dict:
        """Validate and (when it is the best so far, or under DP) write the checkpoint, with the averaged weights
        when ``ema`` is on; then the resumable state."""
        model = self.trainer.model
        with self.average.applied(model) if self.average else nullcontext(model):
            val = self._save_model(running, lr)
        _save_state(self.out, model, self.trainer.optimizer, self.info, self.average)
        self.last = time.time()
        return val

    def _save_model(self, running: list, lr: float | None) -> dict:
        info, model = self.info, self.trainer.model
        info["wall_seconds"] = time.time() - self.started
        info["nonfinite_steps"] = self.nonfinite_before + self.trainer.nonfinite_steps
        val = validation_loss(model, self.val_crops, self.cfg.p_rule)
        if lr is not None:
            self.log(
                json.dumps(
                    {
                        "step": info["step"],
                        "train_loss": round(float(np.mean(running)), 4) if running else None,
                        "val_loss": round(val["loss"], 4),
                        "lr": lr,
                        "levels": [[round(v["bpp"], 3), round(v["psnr"], 2)] for v in val["levels"]],
                        "epsilon": self.epsilon(),
                        "wall_s": round(info["wall_seconds"]),
                        "total_steps": self.before["steps"] + info["step"],
                        "total_h": round((self.before["wall_seconds"] + info["wall_seconds"]) / 3600, 3),
                    }
                )
            )
        meta = dict(self.meta, steps=info["step"], wall_seconds=round(info["wall_seconds"], 1), validation=val)
        meta["total"] = {
            "steps": self.before["steps"] + info["step"],
            "wall_seconds": round(self.before["wall_seconds"] + info["wall_seconds"], 1),
        }
        if self.dp is not None:
            info["dp_history"] = [list(h) for h in self.trainer.history]
            meta["dp"] = dict(
                asdict(self.dp),
                epsilon=self.epsilon(),
                sample_rate=self.trainer.sample_rate,
                dp_history=info["dp_history"],
            )
        if info["best_val"] is None or val["loss"] <= info["best_val"] or self.dp is not None:
            info["best_val"] = val["loss"]
            # the integer coding tables of a checkpoint are derived on the CPU
            on_cpu = torch.device(self.trainer.device).type == "cpu"
            save_model(self.out, model if on_cpu else copy.deepcopy(model).cpu(), meta)
        return val


def training_totals(meta: dict) -> dict:
    """Steps and wall seconds a checkpoint (its ``meta``) has been trained in all: its ``total``, else the sum of
    its ``stages`` (a hand-assembled checkpoint), else its own ``steps``/``wall_seconds``."""
    if "total" in meta:
        return {"steps": int(meta["total"]["steps"]), "wall_seconds": float(meta["total"]["wall_seconds"])}
    parts = list(meta.get("stages", {}).values()) if isinstance(meta.get("stages"), dict) else [meta]
    return {
        "steps": sum(int(p.get("steps", 0)) for p in parts),
        "wall_seconds": sum(float(p.get("wall_seconds", 0.0)) for p in parts),
    }


def trained_before(init_model: str | Path | None) -> dict:
    """:func:`training_totals` of a run's starting checkpoint (zero for a fresh model): a campaign of runs, each
    started from the last one's checkpoint, logs cumulative figures."""
    return training_totals(read_meta(init_model) if init_model else {})


def _check_run(out: Path, cfg: TrainConfig, model_cfg: CodecConfig, dp: DPConfig | None) -> None:
    if cfg.compile and dp is not None:
        raise FedlvcError("--compile is for non-private training (Opacus' hooks see the eager model)")
    if out.suffix != ".safetensors":
        raise FedlvcError(f"--out must end in .safetensors: {out}")
    if not out.parent.is_dir():
        raise FedlvcError(f"output folder does not exist: {out.parent}")
    if cfg.crop_size % model_cfg.stride:
        raise FedlvcError(f"crop size must be a multiple of {model_cfg.stride}")


def _start_model(init_model, model_cfg: CodecConfig, cfg: TrainConfig, motion: bool) -> FedlvcCodec:
    """The model a run starts from (a checkpoint, or a fresh one of ``model_cfg``) with the parts it trains added."""
    model = load_model(init_model).train() if init_model else FedlvcCodec(model_cfg)
    if cfg.segment_frames:
        model = with_temporal_prior(model)
    if motion:
        model = with_motion(model)
    if cfg.train_parts == "adapters":
        model = with_adapters(model)
    return model


def train(
    video_dirs,
    out: str | Path,
    cfg: TrainConfig,
    dp: DPConfig | None = None,
    init_model: str | Path | None = None,
    model_cfg: CodecConfig | None = None,
    log=print,
    progress=None,
    motion: bool = False,
    device: str | torch.device = "cpu",
) -> dict:
    """Train on the frames of ``video_dirs`` and write the best checkpoint to ``out`` (.safetensors), on
    ``device`` (checkpoints are written from the CPU). ``motion``: give the model motion-compensated P-frames
    first (:func:`common.net.model.with_motion`).

    Resumes from ``<out>.train-state.*`` when present. Returns a summary (steps, validation, ε)."""
    out, model_cfg = Path(out), model_cfg or CodecConfig()
    _check_run(out, cfg, model_cfg, dp)
    torch.manual_seed(cfg.seed)
    paths, train_rows, held_out = _training_rows(video_dirs, cfg)
    model = _start_model(init_model, model_cfg, cfg, motion)
    info = _read_info(out)
    if info:
        log(f"resuming from step {info['step']} (best validation loss {info['best_val']})")
    info = info or {"step": 0, "best_val": None, "wall_seconds": 0.0, "dp_history": [], "nonfinite_steps": 0}
    restore = (lambda m, o: _load_tensors(out, m, o)) if info["step"] else None
    trainer = Trainer(
        model, train_rows, cfg, dp=dp, history=info["dp_history"], device=device, fast_layout=True, restore=restore
    )
    meta = {
        "rows": len(train_rows),
        "videos": [p.name for p in paths],
        "train": asdict(cfg),
        "privacy_unit": "segment" if cfg.segment_frames else "frame",
        "trained_before": trained_before(init_model),
    }
    checkpoints = _Checkpoints(out, trainer, cfg, dp, info, meta, _validation_crops(held_out, 128), log)
    running, lr = [], None
    for x, levels in trainer.batches(cfg.steps - info["step"]):
        lr = cfg.learning_rate * (0.1 if info["step"] >= cfg.lr_drop_at * cfg.steps else 1.0)
        loss = trainer.step(x, levels, lr)
        info["step"] += 1
        checkpoints.step_done()
        if not math.isnan(loss):
            running.append(loss)
            if progress:
                progress(info["step"], loss)
        if checkpoints.due():
            checkpoints.save(running, lr)
            running = []
    val = checkpoints.save(running, None)
    trainer.close().cpu()
    return {
        "steps": info["step"],
        "validation": val,
        "epsilon": checkpoints.epsilon(),
        "rows": len(train_rows),
        "sample_rate": trainer.sample_rate,
    }


def local_train(model: FedlvcCodec, rows: list, rc, dp: DPConfig | None, seed: int, device="cpu") -> dict:
    """One site's local work in a federated round (``rc``: the run's RunConfig): ``local-steps`` optimizer steps
    on crops of its rows (frames, or segments), DP-SGD (Poisson sampling, per-sample clipping, noise on every
    trainable parameter) when ``dp`` is given. ``seed`` makes the crops and the training's own randomness
    reproducible; DP noise and sampling come from OS entropy (``common.train.privacy.make_private``).

    Updates ``model`` in place. Returns {"loss", "steps", "sample_rate", "nonfinite_steps", "history" (what
    this call's accountant counted, ``[(σ, q, steps)]``; empty without DP)}."""
    torch.manual_seed(seed)
    trainer = Trainer(model, rows, rc, dp=dp, seed=seed, device=device)
    losses = [trainer.step(x, levels) for x, levels in trainer.batches(rc.local_steps)]
    finite = [v for v in losses if not math.isnan(v)]  # nan: an empty Poisson batch, or no finite sample
    trainer.close().cpu()
    return {
        "loss": float(np.mean(finite)) if finite else float("nan"),
        "steps": len(losses),
        "sample_rate": trainer.sample_rate,
        "nonfinite_steps": trainer.nonfinite_steps,
        "history": [list(h) for h in trainer.history],
    }
