"""The one training loop (common.train.training.Trainer) behind single-site training and a federated round: its
failure policy, and the drop_last hang of the old non-private loader."""

from __future__ import annotations

import math
import threading
from fractions import Fraction

import numpy as np
import pytest
import torch

from common.data.clips import generate_site_clip
from common.errors import FedlvcError
from common.net.model import FedlvcCodec
from common.train.privacy import DPConfig
from common.train.training import MAX_NONFINITE_IN_A_ROW, TrainConfig, Trainer
from tests.conftest import TINY_CONFIG

FRAMES = list(generate_site_clip(2, 0, 64, 48, 10))


def _trainer(dp=None, seed=0, **settings) -> Trainer:
    torch.manual_seed(seed)
    cfg = TrainConfig(**{"crop_size": 32, "batch_size": 4, "learning_rate": 1e-3, **settings})
    rows = FRAMES if not cfg.segment_frames else [np.stack(FRAMES[i : i + 2]) for i in range(0, len(FRAMES) - 1, 2)]
    return Trainer(FedlvcCodec(TINY_CONFIG), rows, cfg, dp=dp)


def _poison_first_sample(trainer: Trainer) -> None:
    """Make the loss of each batch's first sample nan (a sample the model cannot code)."""
    loss_fn = trainer.loss_fn

    def poisoned(out, x, levels):
        loss = loss_fn(out, x, levels)
        return torch.cat([loss[:1] * float("nan"), loss[1:]])

    trainer.loss_fn = poisoned


def _batch(n=4):
    x = torch.stack([torch.from_numpy(f[:32, :32].copy()).permute(2, 0, 1).float() / 255 for f in FRAMES[:n]])
    return x, torch.zeros(n, dtype=torch.long)


def test_without_dp_a_batch_with_a_non_finite_loss_is_skipped():
    trainer = _trainer()
    _poison_first_sample(trainer)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert math.isnan(trainer.step(*_batch()))
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert trainer.nonfinite_steps == 1


def test_under_dp_the_sample_is_zeroed_and_the_step_still_counts():
    """The number of DP steps never depends on the data: the step is taken (its noise added, the accountant
    counts it) with the non-finite sample's gradient zeroed, and the model stays finite."""
    trainer = _trainer(DPConfig(1.0, 1.0))
    _poison_first_sample(trainer)
    loss = trainer.step(*_batch())
    assert math.isfinite(loss) and trainer.nonfinite_steps == 1
    assert sum(n for _, _, n in trainer.history) == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    trainer.close()


def _diverged(trainer: Trainer) -> None:
    loss_fn = trainer.loss_fn
    trainer.loss_fn = lambda out, x, levels: loss_fn(out, x, levels) * float("nan")  # every sample diverged


def test_without_dp_a_run_that_keeps_failing_stops_with_an_error():
    trainer = _trainer()
    _diverged(trainer)
    x, levels = _batch()
    with pytest.raises(FedlvcError, match="diverged"):
        for _ in range(MAX_NONFINITE_IN_A_ROW):
            trainer.step(x, levels)
    assert trainer.nonfinite_steps == MAX_NONFINITE_IN_A_ROW


def test_under_dp_a_run_that_keeps_failing_never_stops():
    """Issue 33: stopping would tell the server that some frame makes the loss overflow, which ε does not
    account. Every step is taken, noised and accounted; the model stays finite."""
    trainer = _trainer(DPConfig(1.0, 1.0))
    _diverged(trainer)
    x, levels = _batch()
    for _ in range(2 * MAX_NONFINITE_IN_A_ROW):
        assert math.isnan(trainer.step(x, levels))
    assert trainer.nonfinite_steps == 2 * MAX_NONFINITE_IN_A_ROW
    assert sum(n for _, _, n in trainer.history) == 2 * MAX_NONFINITE_IN_A_ROW
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    trainer.close()


class _InfGradientOfFirst(torch.autograd.Function):
    """The identity on per-sample losses whose backward sends an inf gradient into the first sample only."""

    @staticmethod
    def forward(ctx, loss):
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.cat([grad[:1] * float("inf"), grad[1:]])


@pytest.mark.parametrize("segment_frames", [0, 2])
def test_under_dp_a_finite_loss_with_an_inf_gradient_is_zeroed_per_sample(segment_frames):
    """A unit whose loss is finite but whose per-sample gradient is not would make the clipped sum NaN (clipping
    scales inf by 0): its row is zeroed before clipping, the others move the model, which stays finite."""
    trainer = _trainer(DPConfig(0.0, 1.0), segment_frames=segment_frames)
    loss_fn = trainer.loss_fn
    trainer.loss_fn = lambda out, x, levels: _InfGradientOfFirst.apply(loss_fn(out, x, levels))
    x, levels = _batch()
    if segment_frames:
        x, levels = torch.stack([x[:2], x[2:]], 1), levels[:2]
    before = [p.detach().clone() for p in trainer.params]
    assert math.isfinite(trainer.step(x, levels)) and trainer.nonfinite_steps == 1
    assert all(torch.isfinite(p.grad).all() for p in trainer.params)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.params))  # the finite samples moved it
    trainer.close()


@pytest.mark.parametrize("segment_frames", [0, 2])
@pytest.mark.parametrize("piece", [1, 2, 4])
def test_a_dp_batch_in_pieces_takes_the_same_step(monkeypatch, piece, segment_frames):
    """max-physical-batch: a Poisson batch processed in pieces gives the same clipped, summed, scaled gradient
    as in one piece, and one accounted step (no noise and no quantization noise here, so they compare)."""
    monkeypatch.setattr(torch.Tensor, "uniform_", lambda self, *a, **k: self.zero_())
    x, levels = _batch(6)
    levels = torch.tensor([0, 1, 2, 3, 4, 5])
    if segment_frames:
        x = torch.stack([x[:3], x[3:]], 1)  # 3 rows of 2 frames
        levels = levels[:3]
    grads, histories, losses = [], [], []
    for size in (0, piece):
        trainer = _trainer(DPConfig(0.0, 0.05), segment_frames=segment_frames, max_physical_batch=size)
        losses.append(trainer.step(x, levels))
        grads.append([p.grad.clone() for p in trainer.params])
        histories.append(trainer.history)
        trainer.close()
    assert histories[0] == histories[1] and sum(n for _, _, n in histories[1]) == 1
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in grads[1])


def test_plain_training_with_fewer_rows_than_the_batch_finishes(tmp_path):
    """train() without DP on 5 training frames with --batch-size 16: the old loader (drop_last, the full batch
    size) yielded no batch and the loop never ended."""
    from common.data.video import write_video
    from common.train.training import TrainConfig, train

    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "a.mkv", FRAMES[:6], Fraction(25))
    result = {}

    def run():
        result["summary"] = train(
            [videos],
            tmp_path / "m.safetensors",
            TrainConfig(steps=3, batch_size=16, crop_size=32, validate_every=1000, checkpoint_seconds=1e9),
            model_cfg=TINY_CONFIG,
            log=lambda s: None,
        )

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=300)
    assert not thread.is_alive(), "train() did not finish"
    assert result["summary"]["steps"] == 3 and result["summary"]["rows"] == 5


def test_cli_train_plans_sigma_for_a_target_epsilon(tmp_path, capsys):
    """`fedlvc train --target-epsilon 8`: σ is planned over the run's steps at its Poisson rate, so the run ends
    at ε ≈ 8; giving σ as well is one clear error."""
    from client.cli import main
    from common.checkpoint import read_meta
    from common.data.video import write_video

    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "a.mkv", FRAMES, Fraction(25))
    out = tmp_path / "m.safetensors"
    common = ["train", str(videos), "--out", str(out), "--steps", "3", "--batch-size", "4", "--crop-size", "32"]
    assert main([*common, "--target-epsilon", "8", "--validate-every", "100", "--quiet"]) == 0
    dp = read_meta(out)["dp"]
    assert dp["epsilon"] == pytest.approx(8.0, rel=0.02) and sum(n for _, _, n in dp["dp_history"]) == 3
    capsys.readouterr()
    assert main([*common, "--target-epsilon", "8", "--noise-multiplier", "1"]) == 2
    assert "not both" in capsys.readouterr().err


def test_cli_train_device_and_cumulative_totals(tmp_path, capsys):
    """`fedlvc train --device` takes a torch device (a missing GPU or a name torch does not know is one clear
    error), and a run started from a checkpoint counts on from that checkpoint's training: its log lines and its
    checkpoint's ``meta.total`` carry the cumulative steps and hours."""
    import json

    import torch

    from client.cli import main
    from common.checkpoint import read_meta
    from common.data.video import write_video

    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "a.mkv", FRAMES, Fraction(25))
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    common = ["train", str(videos), "--steps", "3", "--batch-size", "4", "--crop-size", "32", "--quiet"]
    if not torch.cuda.is_available():
        assert main([*common, "--out", str(first), "--device", "cuda"]) == 2
        assert "sees no CUDA GPU" in capsys.readouterr().err
    assert main([*common, "--out", str(first), "--device", "abacus"]) == 2
    assert "is not a torch device" in capsys.readouterr().err
    assert not first.exists()
    assert main([*common, "--out", str(first), "--device", "cpu", "--validate-every", "1"]) == 0
    before = read_meta(first)["total"]
    assert before["steps"] == 3 and before["wall_seconds"] > 0
    capsys.readouterr()
    assert main([*common, "--out", str(second), "--init-model", str(first), "--validate-every", "1"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [line["total_steps"] for line in lines] == [4, 5, 6]
    assert all(line["total_h"] >= round(before["wall_seconds"] / 3600, 3) for line in lines)
    meta = read_meta(second)  # the best step's checkpoint: its own steps on top of the first run's
    assert meta["total"]["steps"] == 3 + meta["steps"] and meta["total"]["wall_seconds"] > before["wall_seconds"]


def test_cli_train_compile_is_for_non_private_frame_rows(tmp_path, capsys):
    """`fedlvc train --compile` is refused with DP (Opacus hooks the eager model) and with segment rows (their
    forward runs the encoder's choices), each with one clear line."""
    from client.cli import main
    from common.data.video import write_video

    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "a.mkv", FRAMES, Fraction(25))
    common = ["train", str(videos), "--out", str(tmp_path / "m.safetensors"), "--steps", "2", "--compile", "--quiet"]
    assert main([*common, "--noise-multiplier", "1"]) == 2
    assert "--compile is for non-private training" in capsys.readouterr().err
    assert main([*common, "--privacy-unit", "segment", "--segment-frames", "2"]) == 2
    assert "'compile' is for frame rows" in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.slow
def test_cli_train_compile_trains(tmp_path):
    """`fedlvc train --compile` trains frame rows through the compiled forward and records the setting."""
    from client.cli import main
    from common.checkpoint import load_model, read_meta
    from common.data.video import write_video

    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "a.mkv", FRAMES, Fraction(25))
    out = tmp_path / "m.safetensors"
    args = ["train", str(videos), "--out", str(out), "--steps", "3", "--batch-size", "4", "--crop-size", "32"]
    assert main([*args, "--compile", "--validate-every", "1", "--quiet"]) == 0
    meta = read_meta(out)
    assert meta["train"]["compile"] is True and meta["steps"] >= 1
    start = load_model().state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in load_model(out).state_dict().items())


def test_an_average_of_the_weights_is_what_validation_and_the_checkpoint_use_and_it_resumes(tmp_path):
    """`--ema D`: after every step the average moves by (1 − D) towards the weights; the checkpoint holds the
    average (not the last step's weights), and a resumed run continues the saved average instead of starting a
    new one from the weights."""
    from safetensors.torch import load_file

    from client.cli import main
    from common.checkpoint import load_model
    from common.data.video import write_video

    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "a.mkv", FRAMES, Fraction(25))
    out = tmp_path / "m.safetensors"
    state = tmp_path / "m.train-state.safetensors"
    args = ["train", str(videos), "--out", str(out), "--batch-size", "4", "--crop-size", "32", "--ema", "0.5"]
    assert main([*args, "--steps", "3", "--validate-every", "100", "--quiet"]) == 0
    first = load_file(str(state))
    average = {k[4:]: v for k, v in first.items() if k.startswith("ema.")}
    weights = {k[6:]: v for k, v in first.items() if k.startswith("model.")}
    assert average and set(average) <= set(weights)
    assert any(not torch.equal(average[k], weights[k]) for k in average)  # the average lags the weights
    saved = load_model(out).state_dict()
    assert all(torch.equal(saved[k], average[k]) for k in average)  # the last save was the best: the average
    assert main([*args, "--steps", "4", "--validate-every", "100", "--quiet"]) == 0  # resumes: one more step
    second = load_file(str(state))
    for k, before in average.items():
        expected = before + 0.5 * (second[f"model.{k}"] - before)
        torch.testing.assert_close(second[f"ema.{k}"], expected, rtol=1e-6, atol=1e-7)
