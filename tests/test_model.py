"""The codec model: Opacus compatibility, a real DP-SGD step, quality-level checks, per-sample loss."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIG, make_tiny_model
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader

from common.data.clips import FrameCrops, generate_site_clip
from common.errors import FedlvcError
from common.net.architecture import CodecConfig
from common.net.model import FedlvcCodec
from common.train.losses import RateDistortion
from common.train.training import set_trainable

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook:UserWarning")

BATCH = 4


@pytest.fixture(scope="module")
def crop_frames() -> list[np.ndarray]:
    return list(generate_site_clip(2, 0, 64, 48, 8))


def _private(model, frames, noise_multiplier=1.0, max_grad_norm=1.0, lr=0.05, batch_size=BATCH):
    torch.manual_seed(1234)
    dataset = FrameCrops(frames, 32, model.cfg.num_levels, seed=0)
    # Frame rows train the intra path; the P-frame prior (no loss term reaches it) is frozen.
    optimizer = torch.optim.SGD(set_trainable(model, 0), lr=lr)
    loader = DataLoader(dataset, batch_size=batch_size)
    engine = PrivacyEngine()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "secure RNG turned off"
        pmodel, poptim, ploader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            poisson_sampling=True,
        )
    return engine, pmodel, poptim, ploader


def _first_nonempty(loader):
    for x, levels in loader:
        if x.shape[0] > 0:
            return x, levels
    raise AssertionError("every Poisson batch of an epoch was empty")


def test_default_model_passes_strict_opacus_validation():
    assert ModuleValidator.validate(FedlvcCodec(), strict=True) == []


def test_tiny_model_passes_strict_opacus_validation():
    assert ModuleValidator.validate(make_tiny_model().train(), strict=True) == []


def test_dp_sgd_step_has_per_sample_grads_and_updates_every_parameter(crop_frames):
    model = make_tiny_model(3).train()
    _, pmodel, poptim, ploader = _private(model, crop_frames)
    x, levels = _first_nonempty(ploader)
    b = x.shape[0]
    before = {n: p.detach().clone() for n, p in pmodel.named_parameters()}
    trainable = [(n, p) for n, p in pmodel.named_parameters() if p.requires_grad]
    assert trainable and not any("temporal" in n for n, _ in trainable)

    poptim.zero_grad(set_to_none=True)
    loss = RateDistortion(model.cfg.lambdas)(pmodel(x, levels), x, levels)
    assert loss.shape == (b,)
    loss.mean().backward()
    for name, p in trainable:
        gs = p.grad_sample
        assert gs is not None, f"{name} has no per-sample gradient"
        gs = torch.cat(gs) if isinstance(gs, list) else gs
        assert gs.shape == (b, *p.shape), f"{name}: grad_sample {tuple(gs.shape)}"
        assert torch.isfinite(gs).all(), name
    poptim.step()
    for name, p in trainable:
        assert torch.isfinite(p).all(), name
        assert not torch.equal(p.detach(), before[name]), f"{name} did not change in the DP-SGD step"


def test_dp_sgd_clips_each_sample(crop_frames):
    """Without noise, the averaged update has norm <= B*C / expected batch size even though each
    per-sample gradient is far larger than C."""
    c = 1e-3
    model = make_tiny_model(4).train()
    _, pmodel, poptim, ploader = _private(model, crop_frames, noise_multiplier=0.0, max_grad_norm=c)
    x, levels = _first_nonempty(ploader)
    b = x.shape[0]
    poptim.zero_grad(set_to_none=True)
    RateDistortion(model.cfg.lambdas)(pmodel(x, levels), x, levels).mean().backward()
    params = [p for p in pmodel.parameters() if p.requires_grad]
    per_sample = torch.stack([p.grad_sample.reshape(b, -1).norm(dim=1) for p in params]).norm(dim=0)
    assert (per_sample > 10 * c).all(), "test needs unclipped gradients larger than C"
    poptim.step()
    total = torch.stack([p.grad.norm() for p in params]).norm().item()
    assert 0 < total <= b * c / poptim.expected_batch_size * (1 + 1e-4)


def test_empty_poisson_batch_step_adds_noise_only(crop_frames):
    """An empty Poisson batch is still a DP-SGD step: the parameters move by noise alone and the accountant
    counts the step (common.train.training.empty_batch_step)."""
    from common.train.training import empty_batch_step

    model = make_tiny_model(5).train()
    engine, pmodel, poptim, _ = _private(model, crop_frames, noise_multiplier=1.0, lr=0.1)
    before = {n: p.detach().clone() for n, p in pmodel.named_parameters()}
    poptim.zero_grad(set_to_none=True)
    empty_batch_step(pmodel, poptim)
    for name, p in pmodel.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p.detach(), before[name]), f"{name}: no noise on an empty batch"
    assert sum(n for _, _, n in engine.accountant.history) == 1

    # Without noise an empty batch changes nothing.
    model = make_tiny_model(5).train()
    _, pmodel, poptim, _ = _private(model, crop_frames, noise_multiplier=0.0, lr=0.1)
    before = {n: p.detach().clone() for n, p in pmodel.named_parameters()}
    poptim.zero_grad(set_to_none=True)
    empty_batch_step(pmodel, poptim)
    for name, p in pmodel.named_parameters():
        assert torch.equal(p.detach(), before[name]), name


@pytest.mark.parametrize("level", [6, 7, 99, -1])
def test_check_level_out_of_range(level):
    model = make_tiny_model()
    n = len(model.cfg.lambdas)
    assert n == 6
    with pytest.raises(FedlvcError) as e:
        model.check_level(level)
    assert f"quality {level + 1}" in str(e.value)
    assert f"1..{n}" in str(e.value)


def test_check_level_in_range_accepts_every_level():
    model = make_tiny_model()
    for level in range(len(model.cfg.lambdas)):
        model.check_level(level)


def test_check_level_follows_the_config():
    model = FedlvcCodec(CodecConfig(channels=8, latent_channels=8, mixtures=2, lambdas=(0.01, 0.02)))
    model.check_level(1)
    with pytest.raises(FedlvcError, match="quality 3"):
        model.check_level(2)


@torch.no_grad()
def test_rate_distortion_is_per_sample(crop_frames):
    model = make_tiny_model(6).eval()
    loss_fn = RateDistortion(model.cfg.lambdas)
    dataset = FrameCrops(crop_frames, 32, model.cfg.num_levels, seed=3)
    x = torch.stack([dataset[i][0] for i in range(4)])
    levels = torch.tensor([0, 5, 2, 3])
    batch = loss_fn(model(x, levels), x, levels)
    assert batch.shape == (4,)
    assert set(loss_fn.terms) == {"mse", "bpp"} and loss_fn.terms["bpp"].shape == (4,)
    assert torch.isfinite(batch).all()
    for i in range(4):
        alone = loss_fn(model(x[i : i + 1], levels[i : i + 1]), x[i : i + 1], levels[i : i + 1])
        assert alone.shape == (1,)
        assert torch.allclose(alone[0], batch[i], rtol=1e-5, atol=1e-5), (i, alone, batch)
    # Changing another sample leaves sample 0's loss alone.
    x2 = x.clone()
    x2[1:] = 1.0 - x2[1:]
    other = loss_fn(model(x2, levels), x2, levels)
    assert torch.allclose(other[0], batch[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(other[1:], batch[1:])


@torch.no_grad()
def test_rate_distortion_formula():
    model = make_tiny_model(7).eval()
    x = torch.rand(2, 3, 32, 32)
    levels = torch.tensor([1, 4])
    out = model(x, levels)
    loss = RateDistortion(model.cfg.lambdas)(out, x, levels)
    mse = ((out["x_hat"] - x) ** 2).reshape(2, -1).mean(1)
    bpp = -torch.log2(out["likelihoods"]).reshape(2, -1).sum(1) / (32 * 32)
    lam = torch.tensor([model.cfg.lambdas[1], model.cfg.lambdas[4]])
    assert torch.allclose(loss, lam * 255.0**2 * mse + bpp, rtol=1e-6)
    assert (bpp > 0).all()


@torch.no_grad()
def test_eval_forward_is_deterministic_and_train_forward_adds_noise():
    model = make_tiny_model(8)
    x = torch.rand(1, 3, 32, 32)
    levels = torch.tensor([2])
    model.eval()
    a, b = model(x, levels), model(x, levels)
    assert torch.equal(a["x_hat"], b["x_hat"]) and torch.equal(a["likelihoods"], b["likelihoods"])
    model.train()
    c, d = model(x, levels), model(x, levels)
    assert not torch.equal(c["likelihoods"], d["likelihoods"])
    assert c["x_hat"].shape == x.shape
    assert ((c["likelihoods"] > 0) & (c["likelihoods"] <= 1)).all()


def test_tiny_config_is_what_the_suite_assumes():
    assert TINY_CONFIG.num_levels == 6 and TINY_CONFIG.stride == 16


# ----------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_keeps_weights_and_fingerprint(tmp_path):
    from common.checkpoint import config_path, fingerprint, load_model, save_model

    model = make_tiny_model(11)
    path = tmp_path / "m.safetensors"
    save_model(path, model, meta={"note": "x"})
    assert config_path(path).is_file()
    loaded = load_model(path)
    assert not loaded.training and loaded.cfg == model.cfg
    assert fingerprint(loaded) == fingerprint(model)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert fingerprint(make_tiny_model(12)) != fingerprint(model)


def test_load_model_refuses_bad_checkpoints(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from common.checkpoint import config_path, load_model, save_model

    path = tmp_path / "m.safetensors"
    save_model(path, make_tiny_model(13))
    doc = json.loads(config_path(path).read_text())

    with pytest.raises(FedlvcError, match="not found"):
        load_model(tmp_path / "missing.safetensors")

    state = load_file(str(path))
    state["g_a.layers.0.bias"] = state["g_a.layers.0.bias"] + 1.0  # weights no longer match the fingerprint
    save_file(state, str(path))
    with pytest.raises(FedlvcError, match="fingerprint"):
        load_model(path)

    state["g_a.layers.0.bias"][0] = float("nan")
    save_file(state, str(path))
    with pytest.raises(FedlvcError, match="non-finite"):
        load_model(path)

    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(FedlvcError, match="safetensors"):
        load_model(path)

    save_model(path, make_tiny_model(13))
    bad = dict(doc, config=dict(doc["config"], channels=16))  # config does not match the tensors
    config_path(path).write_text(json.dumps(bad))
    with pytest.raises(FedlvcError):
        load_model(path)
    config_path(path).write_text("{not json")
    with pytest.raises(FedlvcError, match="not valid"):
        load_model(path)
    config_path(path).unlink()
    with pytest.raises(FedlvcError, match="config not found"):
        load_model(path)


# ----------------------------------------------------------------------------------- training with DP


def test_dp_training_survives_empty_poisson_batches(tmp_path):
    """train() with DP-SGD at an expected batch of 1 over 19 frames: about a third of the Poisson batches
    are empty; every one of them must still be a (noise-only) step, and the run must finish."""
    from fractions import Fraction

    from common.checkpoint import load_model, read_meta
    from common.data.video import write_video
    from common.train.privacy import DPConfig
    from common.train.training import TrainConfig, train

    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "a.mkv", generate_site_clip(0, 0, 48, 48, 20), Fraction(25))
    out = tmp_path / "m.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = train(
            [videos],
            out,
            TrainConfig(steps=12, batch_size=1, crop_size=32, validate_every=1000, checkpoint_seconds=1e9),
            dp=DPConfig(noise_multiplier=1.0),
            model_cfg=TINY_CONFIG,
            log=lambda s: None,
        )
    assert summary["steps"] == 12
    assert summary["rows"] == 19
    assert 0 < summary["epsilon"] < float("inf")
    meta = read_meta(out)
    assert meta["steps"] == 12
    assert sum(n for _, _, n in meta["dp"]["dp_history"]) == 12  # every step, empty or not, is accounted
    model = load_model(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_plain_training_on_segments_trains_the_p_prior_and_resumes(tmp_path):
    """train() without DP on segment rows (the shipped model's temporal stage): a resumed run continues from
    its train-state up to the new step count, and the P-frame prior moves."""
    from fractions import Fraction

    from common.checkpoint import load_model, read_meta
    from common.data.video import write_video
    from common.net.model import with_temporal_prior
    from common.train.training import TrainConfig, train

    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "a.mkv", generate_site_clip(0, 0, 48, 48, 20), Fraction(25))
    out = tmp_path / "m.safetensors"
    cfg = dict(batch_size=2, crop_size=32, validate_every=1000, checkpoint_seconds=1e9, segment_frames=3)
    logs = []
    first = train([videos], out, TrainConfig(steps=3, **cfg), model_cfg=TINY_CONFIG, log=logs.append)
    assert first["steps"] == 3 and first["epsilon"] is None
    assert [json.loads(line)["step"] for line in logs] == [3]
    logs.clear()
    second = train([videos], out, TrainConfig(steps=5, **cfg), model_cfg=TINY_CONFIG, log=logs.append)
    assert second["steps"] == 5 and logs[0].startswith("resuming from step 3 ")
    assert [json.loads(line)["step"] for line in logs[1:]] == [5]
    assert read_meta(out)["steps"] == 5 and read_meta(out)["privacy_unit"] == "segment"
    model = load_model(out)
    torch.manual_seed(0)
    start = with_temporal_prior(FedlvcCodec(TINY_CONFIG)).state_dict()
    moved = [k for k, v in model.state_dict().items() if k.startswith("temporal.") and not torch.equal(v, start[k])]
    assert moved and all(torch.isfinite(p).all() for p in model.parameters())
