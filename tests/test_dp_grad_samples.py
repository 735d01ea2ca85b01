"""Opacus' per-sample gradients are the gradients of each privacy unit's own loss — for frame rows and for
segment rows (per-frame samples folded per segment) — checked against one backward pass per unit.

The layout matters: on channels_last tensors Opacus' convolution sampler returns wrong per-sample
gradients, which would silently break the clipping bound; ours (``common.train.privacy.conv2d_grad_samples``)
hands it NCHW copies, so every check runs on NCHW and on channels_last models and batches."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from common.config.options import PFrameRule
from common.net.architecture import CodecConfig
from common.net.model import FedlvcCodec
from common.train.losses import RateDistortion, SegmentRateDistortion
from common.train.privacy import fold_segment_grad_samples
from common.train.segments import forward_segment
from common.train.training import set_trainable

CFG = CodecConfig(channels=8, latent_channels=8, mixtures=2)
CFG_V4 = CodecConfig.v4(channels=8, latent_channels=8, hyper_channels=8, mixtures=2)
CFG_FILM = CodecConfig(channels=8, latent_channels=8, mixtures=2, adapters=True)


@pytest.fixture
def no_noise(monkeypatch):
    """Training-mode forward without the uniform quantization noise, so separate passes are comparable."""
    orig = torch.Tensor.uniform_
    monkeypatch.setattr(torch.Tensor, "uniform_", lambda self, *a, **k: self.zero_() if not k else orig(self, *a, **k))


def _per_unit_grads(model, loss_fn, forward, x, levels):
    grads = []
    for i in range(x.shape[0]):
        model.zero_grad()
        loss_fn(forward(model, x[i : i + 1], levels[i : i + 1]), x[i : i + 1], levels[i : i + 1]).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    return grads


def _max_rel_error(model, expected) -> float:
    worst = 0.0
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        for i, g in enumerate(expected):
            worst = max(worst, ((p.grad_sample[i] - g[n]).abs().max() / (g[n].abs().max() + 1e-12)).item())
    return worst


LAYOUTS = [torch.contiguous_format, torch.channels_last]


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("parts", ["all", "entropy"])
@pytest.mark.parametrize("cfg", [CFG, CFG_V4, CFG_FILM], ids=["v3", "v4", "v3-adapters"])
def test_frame_rows_grad_samples_are_per_frame_gradients(no_noise, cfg, parts, layout):
    from common.train.privacy import layout_safe_samples

    torch.manual_seed(0)
    model = FedlvcCodec(cfg).train()
    set_trainable(model, 0, parts)
    assert layout_safe_samples(model)  # as the Trainer decides: these run channels_last under DP
    model = model.to(memory_format=layout)
    x, levels = torch.rand(3, 3, 32, 32).contiguous(memory_format=layout), torch.tensor([0, 2, 5])
    loss_fn = RateDistortion(model.cfg.lambdas)
    expected = _per_unit_grads(model, loss_fn, lambda m, a, b: m(a, b), x, levels)
    GradSampleModule(model)
    model.zero_grad()
    loss_fn(model(x, levels), x, levels).mean().backward()
    assert _max_rel_error(model, expected) < 1e-4


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("cfg", [CFG, CFG_V4, CFG_FILM], ids=["v3", "v4", "v3-adapters"])
@pytest.mark.parametrize("frames,rule", [(2, PFrameRule()), (4, PFrameRule()), (4, PFrameRule(rd_weight=1.0))])
def test_segment_rows_grad_samples_are_per_segment_gradients(no_noise, frames, rule, cfg, layout):
    """Also with rate-distortion optimised P-frames, whose channel sensitivities take a backward pass of
    their own inside the forward: Opacus' hooks must not see it, and a row's choices depend on that row."""
    torch.manual_seed(1)
    model = FedlvcCodec(cfg).train()
    with torch.no_grad():  # gains that make the latents take many values (else all round to 0 and no choice is made)
        model.gain.log_gain.weight.fill_(math.log(100.0))
        model.inv_gain.log_gain.weight.fill_(-math.log(100.0))
    set_trainable(model, frames)
    model = model.to(memory_format=layout)  # segment batches stay 5-D NCHW; the model's layout is training's
    x, levels = torch.rand(3, frames, 3, 32, 32), torch.tensor([1, 3, 4])
    with torch.no_grad():
        y = model.analysis(x.flatten(0, 1), levels.repeat_interleave(frames))
        assert (y.round() != 0).float().mean() > 0.5
        prev, cur = y.round().unflatten(0, (3, frames))[:, :2].unbind(1)
        assert (prev != cur).any()
    loss_fn = SegmentRateDistortion(model.cfg.lambdas)
    forward = lambda m, a, b: forward_segment(m, a, b, rule)  # noqa: E731
    expected = _per_unit_grads(model, loss_fn, forward, x, levels)
    assert expected[0]["temporal.table.weight"].abs().sum() > 0  # the P-frame prior is trained by segments
    if cfg.adapters:  # the adapters of both transforms
        assert expected[0]["g_s.film.0.weight"].abs().sum() > 0 and expected[0]["g_a.film.0.bias"].abs().sum() > 0
    if cfg.hyper:  # and the hyperprior by the segments' I-frames
        assert expected[0]["h_s.out.weight"].abs().sum() > 0 and expected[0]["g_a.layers.1.conv.weight"].abs().sum() > 0
    GradSampleModule(model)
    model.zero_grad()
    loss_fn(forward(model, x, levels), x, levels).mean().backward()
    fold_segment_grad_samples(model, 3, frames)
    assert all(p.grad_sample.shape[0] == 3 for p in model.parameters())
    assert _max_rel_error(model, expected) < 1e-4


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("rule", [PFrameRule(), PFrameRule(rd_weight=1.0)], ids=["rounding", "rdo"])
@pytest.mark.parametrize("parts", ["motion", "all"])
def test_motion_segment_grad_samples_are_per_segment_gradients(no_noise, rule, parts, layout):
    """A motion model's segments: the intra path on the I-frames, the residual codec on the P-frames (B·(S−1)
    rows), the priors on the segments — and the coder's chain (search, prediction, choice) in between, which
    Opacus' hooks must not see and in which a row's decisions depend on that row alone."""
    from common.net.model import with_motion

    torch.manual_seed(2)
    model = with_motion(FedlvcCodec(CFG)).train()
    with torch.no_grad():
        for g in (model.gain, model.res_gain):
            g.log_gain.weight.fill_(math.log(100.0))
        for g in (model.inv_gain, model.res_inv_gain):
            g.log_gain.weight.fill_(-math.log(100.0))
    frames = 3
    set_trainable(model, frames, parts)
    model = model.to(memory_format=layout)
    base = torch.rand(3, 3, 48, 48)
    x = torch.stack([base[..., s : s + 32, 2 * s : 2 * s + 32] for s in range(frames)], 1)  # moving content
    levels = torch.tensor([1, 3, 4])
    loss_fn = SegmentRateDistortion(model.cfg.lambdas)
    forward = lambda m, a, b: forward_segment(m, a, b, rule)  # noqa: E731
    expected = _per_unit_grads(model, loss_fn, forward, x, levels)
    assert (
        expected[0]["res_prior.table.weight"].abs().sum() > 0 and expected[0]["res_g_a.layers.0.weight"].abs().sum() > 0
    )
    GradSampleModule(model)
    model.zero_grad()
    loss_fn(forward(model, x, levels), x, levels).mean().backward()
    fold_segment_grad_samples(model, 3, frames)
    assert all(p.grad_sample.shape[0] == 3 for p in model.parameters() if p.requires_grad)
    assert _max_rel_error(model, expected) < 1e-4


@pytest.mark.parametrize(
    "conv",
    [nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(8, 16, 5, stride=2, padding=2), nn.Conv2d(8, 8, 3, padding=1, groups=8)],
    ids=["3x3", "5x5-stride-2", "depthwise"],
)
def test_the_convolution_sampler_is_ours_and_exact_where_opacus_is_not(conv):
    """Why the convolutions have a sampler of their own: Opacus' gets channels_last inputs wrong (if that
    check starts failing, Opacus fixed it and ours could go); ours equals it on NCHW inputs."""
    from opacus.grad_sample.conv import compute_conv_grad_sample

    from common.train.privacy import conv2d_grad_samples

    assert GradSampleModule.GRAD_SAMPLERS[nn.Conv2d] is conv2d_grad_samples
    torch.manual_seed(0)
    x = torch.randn(4, 8, 12, 12)
    g = torch.randn_like(conv(x))
    last = [t.contiguous(memory_format=torch.channels_last) for t in (x, g)]
    want = compute_conv_grad_sample(conv, [x], g)
    opacus_last = compute_conv_grad_sample(conv, [last[0]], last[1])
    ours_last = conv2d_grad_samples(conv, [last[0]], last[1])
    assert (opacus_last[conv.weight] - want[conv.weight]).abs().max() > 1e-2 * want[conv.weight].abs().max()
    for p in (conv.weight, conv.bias):
        assert torch.allclose(ours_last[p], want[p], atol=1e-5)
        assert torch.equal(conv2d_grad_samples(conv, [x], g)[p], want[p])


def test_film_adapters_have_their_own_sampler_and_are_exact_on_channels_last(no_noise):
    """The adapters' sampler (a reduction, not Opacus' functorch fallback for a Conv2d subclass) gives each
    frame's own gradient whatever the layout: DP training of the adapters alone may run channels_last."""
    from common.net.transforms import FiLM
    from common.train.privacy import film_grad_samples, layout_safe_samples

    assert GradSampleModule.GRAD_SAMPLERS[FiLM] is film_grad_samples
    torch.manual_seed(3)
    model = FedlvcCodec(CFG_FILM).train()
    with torch.no_grad():  # adapters away from identity, so that their gradients differ per frame and channel
        for m in model.modules():
            if isinstance(m, FiLM):
                m.weight.copy_(0.5 + torch.rand_like(m.weight))  # (no_noise makes uniform_ zero)
                m.bias.copy_(0.2 * torch.rand_like(m.bias) - 0.1)
        model.gain.log_gain.weight.fill_(math.log(100.0))  # latents that do not all round to 0
        model.inv_gain.log_gain.weight.fill_(-math.log(100.0))
    set_trainable(model, 0, "adapters")
    assert layout_safe_samples(model)
    model = model.to(memory_format=torch.channels_last)
    x = torch.rand(3, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    levels = torch.tensor([0, 2, 5])
    loss_fn = RateDistortion(model.cfg.lambdas)
    expected = _per_unit_grads(model, loss_fn, lambda m, a, b: m(a, b), x, levels)
    assert all(g["g_s.film.0.weight"].abs().sum() > 0 and g["g_a.film.0.bias"].abs().sum() > 0 for g in expected)
    GradSampleModule(model)
    model.zero_grad()
    loss_fn(model(x, levels), x, levels).mean().backward()
    assert _max_rel_error(model, expected) < 1e-4


@pytest.mark.parametrize(
    "parts,mode,safe",
    [("adapters", "hooks", True), ("entropy", "hooks", True), ("all", "hooks", True), ("all", "functorch", False)],
)
def test_dp_training_runs_channels_last_only_when_every_sampled_module_allows_it(parts, mode, safe):
    from common.train.privacy import DPConfig
    from common.train.training import TrainConfig, Trainer

    frames = [np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(4)]
    cfg = TrainConfig(crop_size=32, batch_size=2, learning_rate=1e-3, train_parts=parts)
    dp = DPConfig(noise_multiplier=1.0, grad_sample_mode=mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(FedlvcCodec(CFG_FILM), frames, cfg, dp=dp, fast_layout=True)
    assert trainer.fast_layout is safe
    conv = trainer.model.g_a.layers[0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) is safe
    assert Trainer(FedlvcCodec(CFG_FILM), frames, cfg, fast_layout=True).fast_layout  # without DP: always


def test_a_module_of_another_type_keeps_dp_training_nchw():
    from common.train.privacy import layout_safe_samples

    assert layout_safe_samples(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1)))
    assert not layout_safe_samples(nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4)))  # its sampler: untested
    frozen_norm = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4))
    frozen_norm[1].requires_grad_(False)
    assert layout_safe_samples(frozen_norm)  # only what trains is sampled
    assert not layout_safe_samples(nn.Sequential(nn.Conv2d(3, 4, 3)), "functorch")
    assert not layout_safe_samples(nn.Sequential(nn.ReLU()))  # nothing trains


def test_the_v4_model_passes_opacus_strict_validation_and_has_no_buffers():
    from opacus.validators import ModuleValidator

    model = FedlvcCodec(CFG_V4)
    assert not list(model.buffers())
    assert ModuleValidator.validate(model, strict=True) == []
