"""Single-site training of the codec (non-private or DP-SGD), resumable, keeping the best checkpoint
by validation rate–distortion loss rather than the last one (training can diverge late)."""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from .bitstream import DEFAULT_RD_WEIGHT, DEFAULT_SKIP_THRESHOLD
from .checkpoint import load_model, save_model
from .data import FrameCrops, SegmentCrops, find_videos, load_clips, make_segments
from .errors import FedlvcError
from .model import (ARCHITECTURE, CodecConfig, FedlvcCodec, PFrameRule, RateDistortion, SegmentRateDistortion,
                    upgrade_temporal_table)
from .privacy import DPConfig, epsilon_from_history, fold_segment_grad_samples, make_private, poisson_sample_rate
from .video import atomic_output


@dataclass
class TrainConfig:
    steps: int = 20000  # total optimizer steps (a resumed run continues up to this)
    batch_size: int = 16  # expected batch size (Poisson under DP)
    crop_size: int = 96  # pixels, a multiple of the model stride
    learning_rate: float = 1e-3
    lr_drop_at: float = 0.75  # fraction of `steps` after which the learning rate is divided by 10
    clip_norm: float = 1.0  # global gradient clipping for non-private training (stability)
    checkpoint_seconds: float = 120.0
    validate_every: int = 250  # steps
    seed: int = 0
    every: int = 1  # use every n-th frame of each video
    max_frames_per_video: int | None = None
    segment_frames: int = 0  # 0: one row = one frame (I-frame training); S >= 2: one row = S consecutive frames
    train_parts: str = "all"  # all | temporal (only the P-frame prior; needs segment_frames)
    rd_weight: float = DEFAULT_RD_WEIGHT  # the encoder's P-frame rule (common.model.PFrameRule), modelled in
    skip_threshold: float = DEFAULT_SKIP_THRESHOLD  # training: RDO weight, or (rd_weight 0) the skip threshold

    @property
    def p_rule(self) -> PFrameRule:
        return PFrameRule.of(self.rd_weight, self.skip_threshold)


def with_temporal_prior(model: FedlvcCodec) -> FedlvcCodec:
    """A model upgraded to the current architecture, same weights: an intra-only (v1) model gains a fresh
    temporal prior; a v2 temporal prior gains the in-frame contexts of v3, every in-frame value starting
    from the v2 scale of its context (so the upgraded model codes as the v2 one did until trained)."""
    if model.cfg.architecture == ARCHITECTURE:
        return model
    cfg = CodecConfig.from_dict(dict(model.cfg.to_dict(), architecture=ARCHITECTURE))
    new = FedlvcCodec(cfg)
    state = dict(model.state_dict())
    if model.cfg.temporal:
        state["temporal.table.weight"] = upgrade_temporal_table(state["temporal.table.weight"], cfg)
    missing, unexpected = new.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("temporal.") for k in missing), (missing, unexpected)
    return new.train(model.training)


TRAIN_PARTS = ("all", "entropy", "temporal")
ENTROPY_MODULES = ("gain.", "inv_gain.", "prior.", "temporal.")


def set_trainable(model: FedlvcCodec, segment_frames: int, parts: str = "all") -> list:
    """Freeze what this kind of training cannot reach or should not touch; return the trainable parameters.

    Frame rows train the intra path (the temporal prior is frozen: no loss term reaches it); segment rows
    train everything. ``parts="entropy"`` keeps only the quantization gains and the priors (0.7 % of the
    shipped model's parameters with frame rows, 3 % with segments: under DP the same noise per coordinate
    meets a clipped gradient spread over far fewer coordinates); ``parts="temporal"`` only the P-frame prior
    (segments)."""
    if parts not in TRAIN_PARTS:
        raise FedlvcError(f"train parts must be one of {', '.join(TRAIN_PARTS)}, not {parts!r}")
    if parts == "temporal" and not segment_frames:
        raise FedlvcError("training only the temporal prior needs segments (segment frames >= 2)")
    for name, p in model.named_parameters():
        temporal = name.startswith("temporal.")
        reachable = bool(segment_frames) or not temporal
        if parts == "temporal":
            p.requires_grad_(temporal)
        elif parts == "entropy":
            p.requires_grad_(reachable and name.startswith(ENTROPY_MODULES))
        else:
            p.requires_grad_(reachable)
    return [p for p in model.parameters() if p.requires_grad]


def rows_dataset(rows: list, crop: int, num_levels: int, segment_frames: int, seed: int,
                 rule: PFrameRule = PFrameRule()):
    """(dataset, loss function, forward) for frame rows or segment rows (P-frames chosen by ``rule``)."""
    if segment_frames:
        return (SegmentCrops(rows, crop, num_levels, seed=seed), SegmentRateDistortion,
                lambda m, x, lv: m.forward_segment(x, lv, rule))
    return FrameCrops(rows, crop, num_levels, seed=seed), RateDistortion, lambda m, x, lv: m(x, lv)


def empty_batch_step(model, optimizer) -> None:
    """An empty Poisson batch is still a DP-SGD step (the accountant counts it): zero per-sample
    gradients, so the update is the Gaussian noise alone."""
    for p in model.parameters():
        if p.requires_grad:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()


def optimizer_step(model, raw_model, optimizer, loss_fn, forward, x: torch.Tensor, levels: torch.Tensor,
                   dp: DPConfig | None, params: list, clip_norm: float) -> float | None:
    """One training step on the batch (x, levels): the rate–distortion loss, backward, then gradient-norm
    clipping (no DP) or Opacus' per-sample clipping and noise (a segment row's per-frame gradient samples
    summed per segment first). ``model`` is what the optimizer was made for (Opacus' wrapper under DP),
    ``raw_model`` the codec itself. An empty Poisson batch is still a step (noise only): returns nan. A
    non-finite loss takes no step: returns None. Otherwise returns the batch's mean loss."""
    optimizer.zero_grad(set_to_none=True)
    if x.shape[0] == 0:
        empty_batch_step(model, optimizer)
        return float("nan")
    loss = loss_fn(forward(raw_model, x, levels), x, levels).mean()
    if not torch.isfinite(loss):
        return None
    with warnings.catch_warnings():
        # Opacus' full backward hooks on the first layer, whose input (the frames) needs no gradient: harmless
        # (tests/test_dp_grad_samples.py checks every per-sample gradient), but torch warns on every step.
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed "
                                "with respect to module outputs")
        loss.backward()
    if dp is None:
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
    elif x.dim() == 5:
        fold_segment_grad_samples(raw_model, x.shape[0], x.shape[1])
    optimizer.step()
    return loss.item()


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
        levels = torch.full((crops.shape[0],), q, dtype=torch.long)
        out = model.forward_segment(crops, levels, rule) if segments else model(crops, levels)
        out["x_hat"] = out["x_hat"].clamp(0, 1)
        total += loss_fn(out, crops, levels).mean().item()
        mse = loss_fn.terms["mse"].mean().item()
        per_level.append({"bpp": loss_fn.terms["bpp"].mean().item(), "psnr": 10 * math.log10(1 / max(mse, 1e-12))})
    model.train(was_training)
    return {"loss": total / model.cfg.num_levels, "levels": per_level}


def _state_paths(out: Path):
    stem = out.with_suffix("")
    return Path(f"{stem}.train-state.safetensors"), Path(f"{stem}.train-state.json")


def _save_state(out: Path, model, optimizer, info: dict) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for i, st in optimizer.state_dict()["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{i}.{k}"] = v.detach().cpu().contiguous().reshape(v.shape)
    tpath, jpath = _state_paths(out)
    with atomic_output(tpath) as tmp:
        save_file(tensors, str(tmp))
    with atomic_output(jpath) as tmp:
        tmp.write_text(json.dumps(info, indent=2))


def _load_state(out: Path, model, optimizer) -> dict | None:
    tpath, jpath = _state_paths(out)
    if not (tpath.is_file() and jpath.is_file()):
        return None
    info = json.loads(jpath.read_text())
    tensors = load_file(str(tpath))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt_state = optimizer.state_dict()
    for i in opt_state["param_groups"][0]["params"]:
        st = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
        if st:
            opt_state["state"][i] = st
    optimizer.load_state_dict(opt_state)
    return info


def train(video_dirs, out: str | Path, cfg: TrainConfig, dp: DPConfig | None = None,
          init_model: str | Path | None = None, model_cfg: CodecConfig | None = None, log=print,
          progress=None) -> dict:
    """Train on the frames of ``video_dirs`` and write the best checkpoint to ``out`` (.safetensors).

    Resumes from ``<out>.train-state.*`` when present. Returns a summary (steps, validation, ε)."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise FedlvcError(f"--out must end in .safetensors: {out}")
    if not out.parent.is_dir():
        raise FedlvcError(f"output folder does not exist: {out.parent}")
    torch.manual_seed(cfg.seed)
    paths = find_videos(video_dirs)
    clips = load_clips(paths, cfg.every, cfg.max_frames_per_video)
    rows = make_segments(clips, cfg.segment_frames) if cfg.segment_frames else [f for c in clips for f in c]
    if not rows:
        raise FedlvcError(f"the videos hold no segment of {cfg.segment_frames} consecutive frames")
    held_out = rows[::20]
    train_rows = [f for i, f in enumerate(rows) if i % 20] or rows
    if model_cfg is None:
        model_cfg = CodecConfig()
    if cfg.crop_size % model_cfg.stride:
        raise FedlvcError(f"crop size must be a multiple of {model_cfg.stride}")
    model = load_model(init_model).train() if init_model else FedlvcCodec(model_cfg)
    if cfg.segment_frames:
        model = with_temporal_prior(model)
    # channels_last is faster on CPU, but Opacus' convolution gradient sampler gives wrong per-sample
    # gradients on channels_last activations or weights (tests/test_dp_grad_samples.py), so DP stays NCHW.
    fast_layout = dp is None
    if fast_layout:
        model = model.to(memory_format=torch.channels_last)
    val_crops = _validation_crops(held_out, 128)
    dataset, loss_cls, forward = rows_dataset(train_rows, cfg.crop_size, model.cfg.num_levels, cfg.segment_frames,
                                              cfg.seed, cfg.p_rule)
    params = set_trainable(model, cfg.segment_frames, cfg.train_parts)
    optimizer = torch.optim.Adam(params, lr=cfg.learning_rate)
    info = _load_state(out, model, optimizer) or {
        "step": 0, "best_val": None, "wall_seconds": 0.0, "dp_history": [], "nonfinite_steps": 0,
    }
    if info["step"]:
        log(f"resuming from step {info['step']} (best validation loss {info['best_val']})")
    loss_fn = loss_cls(model.cfg.lambdas)
    engine = None
    if dp is not None:
        loader = DataLoader(dataset, batch_size=cfg.batch_size)
        engine, model, optimizer, loader = make_private(model, optimizer, loader, dp, info["dp_history"])
        raw_model = model._module
    else:
        loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True)
        raw_model = model
    sample_rate = poisson_sample_rate(len(dataset), cfg.batch_size)
    meta_base = {"rows": len(train_rows), "videos": [p.name for p in paths], "train": asdict(cfg),
                 "privacy_unit": "segment" if cfg.segment_frames else "frame"}

    def epsilon():
        if dp is None:
            return None
        hist = engine.accountant.history
        return epsilon_from_history(hist, dp.delta, dp.accountant) if dp.noise_multiplier > 0 else float("inf")

    def checkpoint(val):
        meta = dict(meta_base, steps=info["step"], wall_seconds=round(info["wall_seconds"], 1), validation=val)
        if dp is not None:
            meta["dp"] = dict(asdict(dp), epsilon=epsilon(), sample_rate=sample_rate,
                              dp_history=[list(h) for h in engine.accountant.history])
        if info["best_val"] is None or val["loss"] <= info["best_val"] or dp is not None:
            # Under DP every step is spent privacy: the released model is the last one, not a cherry-pick.
            info["best_val"] = val["loss"]
            save_model(out, raw_model, meta)
        if dp is not None:
            info["dp_history"] = [list(h) for h in engine.accountant.history]
        _save_state(out, raw_model, optimizer, info)

    last_ckpt = time.time()
    t0 = time.time() - info["wall_seconds"]
    running = []
    model.train()
    while info["step"] < cfg.steps:
        for x, levels in loader:
            if info["step"] >= cfg.steps:
                break
            lr = cfg.learning_rate * (0.1 if info["step"] >= cfg.lr_drop_at * cfg.steps else 1.0)
            for g in optimizer.param_groups:
                g["lr"] = lr
            if fast_layout and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            loss = optimizer_step(model, raw_model, optimizer, loss_fn, forward, x, levels, dp, params,
                                  cfg.clip_norm)
            if loss is None:
                info["nonfinite_steps"] += 1
                continue
            info["step"] += 1
            if math.isnan(loss):  # an empty Poisson batch: a step, noise only
                continue
            running.append(loss)
            if progress:
                progress(info["step"], loss)
            if info["step"] % cfg.validate_every == 0 or time.time() - last_ckpt > cfg.checkpoint_seconds \
                    or info["step"] == cfg.steps:
                info["wall_seconds"] = time.time() - t0
                val = validation_loss(raw_model, val_crops, cfg.p_rule)
                log(json.dumps({"step": info["step"], "train_loss": round(float(np.mean(running)), 4),
                                "val_loss": round(val["loss"], 4), "lr": lr,
                                "levels": [[round(v["bpp"], 3), round(v["psnr"], 2)] for v in val["levels"]],
                                "epsilon": epsilon(), "wall_s": round(info["wall_seconds"])}))
                running = []
                checkpoint(val)
                last_ckpt = time.time()
    info["wall_seconds"] = time.time() - t0
    val = validation_loss(raw_model, val_crops, cfg.p_rule)
    checkpoint(val)
    return {"steps": info["step"], "validation": val, "epsilon": epsilon(), "rows": len(train_rows),
            "sample_rate": sample_rate}


def local_train(model: FedlvcCodec, rows: list, steps: int, batch_size: int, crop_size: int,
                learning_rate: float, dp: DPConfig | None = None, seed: int = 0,
                device: str | torch.device = "cpu", segment_frames: int = 0,
                rule: PFrameRule = PFrameRule(), parts: str = "all") -> dict:
    """One site's local work in a federated round: ``steps`` optimizer steps on crops of its rows (frames,
    or segments of ``segment_frames`` consecutive frames), DP-SGD (Poisson sampling, per-sample clipping,
    noise on every trainable parameter) when ``dp`` is given. ``seed`` makes the crops and the training's
    own randomness reproducible; DP noise and sampling come from OS entropy (``common.privacy.make_private``).

    Updates ``model`` in place. Returns {"loss", "steps", "sample_rate", "history" (what this call's
    accountant counted, ``[(σ, q, steps)]``; empty without DP)}."""
    torch.manual_seed(seed)
    dataset, loss_cls, forward = rows_dataset(rows, crop_size, model.cfg.num_levels, segment_frames, seed, rule)
    sample_rate = poisson_sample_rate(len(dataset), batch_size)
    model = model.to(device).train()
    params = set_trainable(model, segment_frames, parts)
    optimizer = torch.optim.Adam(params, lr=learning_rate)
    loss_fn = loss_cls(model.cfg.lambdas)
    if dp is not None:
        loader = DataLoader(dataset, batch_size=batch_size)
        engine, wrapped, optimizer, loader = make_private(model, optimizer, loader, dp)
    else:
        engine, wrapped = None, model
        loader = DataLoader(dataset, batch_size=min(batch_size, len(dataset)), shuffle=True, drop_last=True)
    done, losses = 0, []
    while done < steps:
        for x, levels in loader:
            if done >= steps:
                break
            done += 1
            loss = optimizer_step(wrapped, model, optimizer, loss_fn, forward, x.to(device), levels.to(device),
                                  dp, params, 1.0)
            if loss is None:
                raise FloatingPointError("non-finite loss in local training")
            if not math.isnan(loss):  # nan: an empty Poisson batch, a step of noise only
                losses.append(loss)
    for p in model.parameters():
        p.requires_grad_(True)
    if engine is not None:
        wrapped._close()  # remove Opacus' hooks so the module can be wrapped again next round
    model.cpu()
    return {"loss": float(np.mean(losses)) if losses else float("nan"), "steps": done, "sample_rate": sample_rate,
            "history": [list(h) for h in engine.accountant.history] if engine is not None else []}
