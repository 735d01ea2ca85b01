"""Architecture v3 P-frames: contexts inside a frame (channel groups), rate–distortion optimised choice of a
P-frame's latent, the channel sensitivities it weighs distortion with, and compatibility with v2 models and
the streams they wrote."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import restream
from test_temporal import FPS, PLAIN, H, W, cli, clip, decode_all, expect_user_error, make_temporal_model, payloads

from common.checkpoint import fingerprint, load_model, save_model
from common.codec import DEFAULT_P_RULE, FrameDecoder, FrameEncoder, encode_frames
from common.coding import bitstream as bs
from common.coding.entropy import LatentCoders
from common.coding.latent import Condition
from common.coding.rdo import choose_p_latent, synthesis_sensitivity
from common.config.options import PFrameRule
from common.data.video import write_video
from common.net.architecture import ARCHITECTURE, ARCHITECTURE_V2
from common.net.model import with_temporal_prior
from common.net.temporal import (
    IN_FRAME_VALUES,
    P_GROUPS,
    TEMPORAL_CONTEXTS,
    channel_groups,
    next_history,
    p_context,
    temporal_context,
)

V2_DATA = Path(__file__).parent / "data" / "v2"


@pytest.fixture(scope="module")
def v3_model():
    m = make_temporal_model(0)
    assert m.cfg.architecture == ARCHITECTURE and m.cfg.p_groups == P_GROUPS
    return m


@pytest.fixture(scope="module")
def v2_model():
    m = load_model(V2_DATA / "tiny-v2.safetensors")
    assert m.cfg.architecture == ARCHITECTURE_V2 and m.cfg.p_groups == 1
    return m


# ------------------------------------------------------------------------------- 1. contexts inside a frame


def test_channel_groups_cover_the_channels_in_order():
    for c, g in ((8, 4), (96, 4), (10, 4), (3, 1)):
        groups = channel_groups(c, g)
        assert len(groups) == g and groups[0].start == 0 and groups[-1].stop == c
        assert all(a.stop == b.start for a, b in zip(groups, groups[1:]))
        assert max(s.stop - s.start for s in groups) - min(s.stop - s.start for s in groups) <= 1


def test_in_frame_context_counts_earlier_groups_at_the_position():
    """8 channels in 4 groups of 2, a 1x5 latent. Earlier groups changed: two elements at x=1, one at x=3,
    none at x=0 (next to a change), none at x=4 (two away from any change)... per group, by hand."""
    prev = torch.zeros(1, 8, 1, 5)
    cur = prev.clone()
    cur[0, 0, 0, 1] = 3  # group 0 changes at x=1
    cur[0, 1, 0, 1] = -1  # ... twice
    cur[0, 2, 0, 3] = 2  # group 1 changes at x=3
    cur[0, 4, 0, 1] = 1  # group 2 changes at x=1 (its own change does not count for itself)
    cur[0, 5, 0, 1] = 1
    tctx = temporal_context(prev, None)
    ctx = p_context(prev, None, cur, P_GROUPS)
    value = ctx - tctx * IN_FRAME_VALUES
    assert int(value.min()) >= 0 and int(value.max()) < IN_FRAME_VALUES
    # value per x: 0 = nothing changed there or next to it; 1 = next to a change; 2/3/4 = 1 / 2-3 / >=4 there
    expected = {0: [0, 0, 0, 0, 0], 1: [1, 3, 1, 0, 0], 2: [1, 3, 1, 2, 1], 3: [1, 4, 1, 2, 1]}
    for g, sl in enumerate(channel_groups(8, P_GROUPS)):
        for c in range(sl.start, sl.stop):
            assert value[0, c, 0].tolist() == expected[g], (g, c, value[0, c, 0].tolist())


def test_a_decoder_needs_only_the_earlier_groups():
    """The contexts of group g are the same whatever the later groups hold (they are not decoded yet)."""
    g = torch.Generator().manual_seed(3)
    prev = torch.randint(-3, 4, (1, 12, 4, 5), generator=g).float()
    before = torch.randint(-3, 4, (1, 12, 4, 5), generator=g).float()
    history = next_history(None, before, prev)
    cur = prev + (torch.rand(prev.shape, generator=g) < 0.3).float() * torch.randint(-2, 3, prev.shape, generator=g)
    full = p_context(prev, history, cur, P_GROUPS)
    for sl in channel_groups(12, P_GROUPS):
        partial = cur.clone()
        partial[:, sl.start :] = torch.randint(-9, 10, partial[:, sl.start :].shape, generator=g).float()
        assert torch.equal(p_context(prev, history, partial, P_GROUPS)[:, sl], full[:, sl])
    # v2: one group, the temporal context alone
    assert torch.equal(p_context(prev, history, None, 1), temporal_context(prev, history))
    assert int(full.max()) < TEMPORAL_CONTEXTS * IN_FRAME_VALUES


def test_p_frame_scales_depend_on_the_earlier_groups(v3_model):
    """The coder's scales for a later group change when an earlier group changes (the in-frame context is
    really used), and not for the first group."""
    coder = LatentCoders(v3_model).p
    prev = np.zeros((8, 3, 3), dtype=np.int64)
    still = prev.copy()
    moved = prev.copy()
    moved[0:2] = 2  # the whole first group changed everywhere
    a = coder.fit(still, Condition(3, prev))[1][1].reshape(8, 9)
    b = coder.fit(moved, Condition(3, prev))[1][1].reshape(8, 9)
    first = channel_groups(8, P_GROUPS)[0]
    np.testing.assert_array_equal(a[first], b[first])
    assert not np.allclose(a[first.stop :], b[first.stop :])


# ------------------------------------------------------------------- 2. rate-distortion optimised P-frames


def _laplace_bits(v, mean, scale):
    """−log2 of a Laplace(mean, scale) quantized to unit bins, written out independently of the model code."""
    a = np.abs(v - mean)
    p = np.where(a < 0.5, 1 - np.exp(-0.5 / scale), 0.5 * (np.exp(-(a - 0.5) / scale) - np.exp(-(a + 0.5) / scale)))
    return -np.log2(np.maximum(p, 1e-9))


def _random_case(seed: int, channels: int = 8):
    g = torch.Generator().manual_seed(seed)
    prev = torch.randint(-4, 5, (1, channels, 4, 4), generator=g).float()
    history = next_history(None, prev + torch.randint(-1, 2, prev.shape, generator=g).float(), prev)
    y = prev + torch.randn(prev.shape, generator=g) * 1.5
    return y, prev, history


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rdo_picks_the_cheapest_candidate(v3_model, seed):
    """Every element takes the candidate (previous value, round(y), round(y) a step towards the previous
    value) of least κ·λ·255²/3·w_c·(y − v)² + bits(v), its bits under the contexts of the groups chosen
    before it — recomputed here in float64 NumPy from the coder's scale table."""
    y, prev, history = _random_case(seed)
    level, kappa = 3, 2.0
    weights = torch.rand(1, 8, generator=torch.Generator().manual_seed(seed)) * 0.01
    lam = torch.tensor([v3_model.cfg.lambdas[level]])
    raw = v3_model.temporal(torch.tensor([level])).detach()
    rule = PFrameRule(rd_weight=kappa)
    chosen = choose_p_latent(y, prev, history, raw, P_GROUPS, rule, 255, lam, weights)[0][0].numpy()
    table = LatentCoders(v3_model).p.scale_table(level)
    yn, pn = y[0].double().numpy(), prev[0].numpy()
    r = np.round(yn)
    towards = np.where(np.abs(r - pn) >= 2, r - np.sign(r - pn), r)
    dist = kappa * lam.item() * 255**2 / 3 * weights[0].double().numpy()[:, None, None]
    ctx = p_context(prev, history, torch.from_numpy(chosen)[None].float(), P_GROUPS)[0].numpy()
    scale = np.take_along_axis(table, ctx.reshape(8, -1), axis=1).reshape(ctx.shape)
    costs = np.stack([dist * (yn - c) ** 2 + _laplace_bits(c, pn, scale) for c in (pn, r, towards)])
    chosen_cost = dist * (yn - chosen) ** 2 + _laplace_bits(chosen, pn, scale)
    assert np.all((chosen == pn) | (chosen == r) | (chosen == towards))
    np.testing.assert_allclose(chosen_cost, costs.min(0), rtol=1e-4, atol=1e-4)
    assert (chosen == pn).any() and (chosen != pn).any()  # a real choice was made


def test_rdo_limits(v3_model):
    """A huge weight on distortion codes round(y); a negligible one keeps the previous latent (the mode of a
    Laplace centred on it); no weight at all is the skip rule."""
    y, prev, history = _random_case(5)
    raw = v3_model.temporal(torch.tensor([2])).detach()
    lam, w = torch.tensor([0.01]), torch.ones(1, 8)
    big, _ = choose_p_latent(y, prev, history, raw, P_GROUPS, PFrameRule(rd_weight=1e6), 255, lam, w)
    tiny, _ = choose_p_latent(y, prev, history, raw, P_GROUPS, PFrameRule(rd_weight=1e-9), 255, lam, w)
    assert torch.equal(big, torch.round(y))
    assert torch.equal(tiny, prev)
    skip, _ = choose_p_latent(y, prev, history, raw, P_GROUPS, PFrameRule(skip_threshold=0.5), 255)
    assert torch.equal(skip, torch.where((y - prev).abs() < 1.0, prev, torch.round(y)))


def test_rdo_stream_round_trip_and_rate(tmp_path, v3_model):
    """fedlvc compress's default rule: the decoder (which knows nothing of it) reproduces the encoder's
    latents; it spends fewer bits than plain rounding and reaches a lower rate-distortion cost
    λ·255²·MSE·pixels + bits, measured on the decoded frames."""
    frames = clip(10)
    assert DEFAULT_P_RULE.uses_rd
    sizes, costs = {}, {}
    for name, rule in (("rdo", DEFAULT_P_RULE), ("plain", PLAIN)):
        path = tmp_path / f"{name}.lvc"
        summary = encode_frames(iter(frames), path, v3_model, 4, FPS, gop=10, rule=rule)
        decoded = decode_all(path, v3_model)
        mse = np.mean((decoded.astype(float) - np.stack(frames).astype(float)) ** 2) / 255**2
        sizes[name] = summary["bytes"]
        costs[name] = v3_model.cfg.lambdas[3] * 255**2 * mse * len(frames) * H * W + 8 * summary["bytes"]
    assert sizes["rdo"] < sizes["plain"], sizes
    assert costs["rdo"] < costs["plain"], costs
    encoder = FrameEncoder(v3_model, 4, gop=10, rule=DEFAULT_P_RULE)
    decoder = FrameDecoder(v3_model, 4, H, W, 10)
    for frame in frames:
        _, payload = encoder.encode(frame)
        np.testing.assert_array_equal(decoder.decode_latent(payload), encoder.state.prev)


def test_synthesis_sensitivity_is_the_jacobian_column_norm(v3_model):
    """Hutchinson's estimate (many probes) against the exact squared column norms of the synthesis
    Jacobian, averaged over positions, on a latent that makes the decoder's activations vary."""
    level = 2
    y = torch.randint(-20, 21, (1, 8, 3, 3), generator=torch.Generator().manual_seed(0)).float()
    lv = torch.tensor([level])
    jac = torch.autograd.functional.jacobian(lambda t: v3_model.synthesis(t, lv), y)  # (1,3,48,48, 1,8,3,3)
    exact = jac.reshape(-1, 8, 9).pow(2).sum(0).mean(1)
    estimate = synthesis_sensitivity(v3_model, y, lv, probes=400)[0]
    np.testing.assert_allclose(estimate.numpy(), exact.numpy(), rtol=0.15)
    once = synthesis_sensitivity(v3_model, y, lv)[0]  # one probe, as the coder uses: right order of magnitude
    assert torch.all(once > exact / 4) and torch.all(once < exact * 4)
    # The same row in a batch gets the same estimate (the probe is shared by all rows; batched convolutions
    # may differ in the last bits).
    batch = torch.cat([y, -y, y])
    both = synthesis_sensitivity(v3_model, batch, torch.tensor([level, 0, level]))
    torch.testing.assert_close(both[0], once, rtol=1e-5, atol=0)
    torch.testing.assert_close(both[2], once, rtol=1e-5, atol=0)
    assert not torch.allclose(both[1], once)


# --------------------------------------------------------------------------------- 3. v2 models and streams


def test_v2_streams_of_the_previous_release_decode(v2_model):
    """Streams that fedlvc 5d5a5f5 wrote with a v2 model (single-pass P-frames; bitstream version 2) decode
    to the same frames, and the current encoder with the same rule codes the same latents: its (version 3)
    stream rewritten as version 2 is the old file byte for byte."""
    expected = json.loads((V2_DATA / "expected.json").read_text())
    frames = clip(10, 48, 40)
    for name in ("gop4-plain", "gop10-skip02"):
        e = expected[name]
        path = V2_DATA / f"{name}.lvc"
        decoded = decode_all(path, v2_model)
        assert hashlib.sha256(decoded.tobytes()).hexdigest() == e["decoded_sha256"]
        again = Path(str(path) + ".again.lvc")
        try:
            encode_frames(
                iter(frames),
                again,
                v2_model,
                e["quality"],
                FPS,
                gop=e["gop"],
                rule=PFrameRule(skip_threshold=e["skip_threshold"]),
            )
            assert again.read_bytes()[4] == bs.VERSION == 3
            assert restream(again.read_bytes(), v2_model, version=2) == path.read_bytes()
        finally:
            again.unlink(missing_ok=True)


def test_v2_model_upgraded_to_v3_codes_the_same_payloads(tmp_path, v2_model):
    """with_temporal_prior gives a v2 model the in-frame contexts with every in-frame value starting from
    the v2 scale of its context: until trained, it codes the same latents into the same ANS payloads (under
    its own fingerprint, which the version 3 latent checksums are keyed by)."""
    upgraded = with_temporal_prior(v2_model).eval()
    assert upgraded.cfg.architecture == ARCHITECTURE and fingerprint(upgraded) != fingerprint(v2_model)
    frames = clip(10, 48, 40)
    a, b = tmp_path / "v2.lvc", tmp_path / "v3.lvc"
    encode_frames(iter(frames), a, v2_model, 4, FPS, gop=10, rule=PLAIN)
    encode_frames(iter(frames), b, upgraded, 4, FPS, gop=10, rule=PLAIN)
    assert payloads(a.read_bytes()) != payloads(b.read_bytes())  # the checksums differ
    assert payloads(restream(a.read_bytes(), v2_model, version=2)) == payloads(
        restream(b.read_bytes(), upgraded, version=2)
    )
    np.testing.assert_array_equal(decode_all(a, v2_model), decode_all(b, upgraded))
    with pytest.raises(Exception, match="different model"):
        decode_all(a, upgraded)


def test_v2_stream_is_not_decoded_by_the_v3_contexts(tmp_path, v2_model):
    """The fingerprint keeps a v2 stream from being read with v3 contexts: a v3 model with the v2 weights
    would decode other latents from the same payload."""
    upgraded = with_temporal_prior(v2_model).eval()
    with torch.no_grad():
        upgraded.temporal.table.weight.add_(torch.linspace(-1, 1, upgraded.temporal.table.weight.shape[1]))
    path = V2_DATA / "gop4-plain.lvc"
    payload = payloads(path.read_bytes())[1]
    ref = FrameDecoder(v2_model, 4, 40, 48, 4, version=2)
    ref.decode_latent(payloads(path.read_bytes())[0])
    dec = FrameDecoder(upgraded, 4, 40, 48, 4, version=2)
    dec.decode_latent(payloads(path.read_bytes())[0])
    y2 = ref.decode_latent(payload)
    try:
        y3 = dec.decode_latent(payload)
    except Exception:
        return  # refused outright: fine
    assert not np.array_equal(y2, y3)


# -------------------------------------------------------------------------------------------- 4. the CLI


def test_cli_p_frame_rule_options(capsys, tmp_path):
    m_path = tmp_path / "m.safetensors"
    save_model(m_path, make_temporal_model(0))
    src = tmp_path / "clip.mkv"
    write_video(src, clip(6, 32, 32), FPS)
    sizes = {}
    for name, opts in (
        ("default", []),
        ("rd2", ["--rd-weight", "2"]),
        ("skip", ["--rd-weight", "0", "--skip-threshold", "0.3"]),
        ("plain", ["--rd-weight", "0"]),
    ):
        out = tmp_path / f"{name}.lvc"
        rc, _, err = cli(capsys, "compress", src, out, "--model", m_path, "--quiet", *opts)
        assert rc == 0, err
        sizes[name] = out.stat().st_size
    assert sizes["plain"] > sizes["default"]
    for bad, word in (
        (["--skip-threshold", "0.2"], "--rd-weight 0"),
        (["--rd-weight", "-1"], "--rd-weight"),
        (["--rd-weight", "nan"], "--rd-weight"),
        (["--rd-weight", "0", "--skip-threshold", "12"], "--skip-threshold"),
    ):
        msg = expect_user_error(capsys, ["compress", src, tmp_path / "x.lvc", "--model", m_path, *bad], tmp_path)
        assert word in msg, msg


def test_cli_train_upgrades_a_v2_model_and_trains_only_its_temporal_prior(capsys, tmp_path):
    """The shipped model's third stage in small: `fedlvc train --train-parts temporal` from a v2 model gives a
    v3 model whose transforms, gains and I-frame prior are bit-identical and whose P-frame prior moved."""
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "a.mkv", clip(24, 48, 48), FPS)
    out = tmp_path / "v3.safetensors"
    rc, _, err = cli(
        capsys,
        "train",
        videos,
        "--out",
        out,
        "--init-model",
        V2_DATA / "tiny-v2.safetensors",
        "--privacy-unit",
        "segment",
        "--segment-frames",
        "4",
        "--train-parts",
        "temporal",
        "--steps",
        "6",
        "--batch-size",
        "2",
        "--crop-size",
        "32",
        "--lr",
        "0.05",
        "--quiet",
    )
    assert rc == 0, err
    old, new = load_model(V2_DATA / "tiny-v2.safetensors"), load_model(out)
    assert new.cfg.architecture == ARCHITECTURE
    old_state, new_state = old.state_dict(), new.state_dict()
    assert set(new_state) == set(old_state)
    for name, t in old_state.items():
        if name.startswith("temporal."):
            assert new_state[name].shape[1] == t.shape[1] * IN_FRAME_VALUES
            assert not torch.equal(new_state[name], with_temporal_prior(old).state_dict()[name])
        else:
            assert torch.equal(new_state[name], t), name
    msg = expect_user_error(
        capsys,
        ["train", videos, "--out", tmp_path / "x.safetensors", "--privacy-unit", "segment", "--skip-threshold", "0.2"],
        tmp_path,
    )
    assert "--rd-weight 0" in msg


def test_rdo_bits_in_closed_form_equal_the_likelihood():
    """choose_p_latent prices candidates with a closed form of the quantized Laplace (faster than calling
    laplace_likelihood three times per group); it must stay the same function, floor included."""
    from common.net.temporal import laplace_bit_tables, laplace_bits, laplace_likelihood, laplace_scale

    raw = torch.linspace(-8, 6, 57, dtype=torch.float64)[:, None]
    scale = laplace_scale(raw)
    k = torch.arange(0, 40, dtype=torch.float64)[None, :]
    closed = laplace_bits(*(t.expand_as(k * scale) for t in laplace_bit_tables(raw)), k)
    exact = -torch.log2(laplace_likelihood(k, torch.zeros(()), scale))
    torch.testing.assert_close(closed, exact, rtol=1e-9, atol=1e-9)
    assert exact.max() == pytest.approx(-math.log2(1e-9))  # the floor is reached and matched
