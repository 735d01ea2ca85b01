"""Motion-compensated P-frames (model config ``motion``, bitstream version 5; common.motion.residual): round trips that
match the encoder's own reconstruction, random access, damaged or forged motion data refused, I-frames as the
base model codes them, versions and models kept apart, and training that moves only the motion parts."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from common.codec import FrameEncoder, decode_stream, encode_frames
from common.coding import bitstream as bs
from common.config.options import PFrameRule
from common.errors import FedlvcError
from common.motion.blocks import block_grid
from common.net.architecture import CodecConfig
from common.net.model import FedlvcCodec, with_motion
from common.train.segments import forward_segment
from common.train.training import set_trainable
from tests.conftest import make_coding_model, on_both_kernel_paths


def motion_model(seed: int = 0) -> FedlvcCodec:
    """The coding test model (latents that take many values) with motion P-frames whose residual codec is a
    copy of its intra one, as ``fedlvc train --motion`` starts."""
    return with_motion(make_coding_model(seed)).eval()


def panning(n: int = 7, h: int = 40, w: int = 56, seed: int = 0, step: int = 2) -> np.ndarray:
    """A smooth random texture panned by ``step`` pixels a frame (right and down), odd sizes included."""
    rng = np.random.default_rng(seed)
    big = rng.integers(0, 256, (h // 4 + n + 2, w // 4 + n + 2, 3)).astype(np.float32)
    big = np.kron(big, np.ones((4, 4, 1)))  # blocks of 4x4: texture motion search can lock on
    return np.stack([big[i * step : i * step + h, i * step : i * step + w] for i in range(n)]).astype(np.uint8)


def _encoded(tmp_path, model, clip, quality=3, gop=4, rule=None):
    path = tmp_path / "m.lvc"
    summary = encode_frames(iter(clip), path, model, quality, Fraction(25), gop, rule=rule)
    return path, summary


def test_motion_streams_round_trip_to_the_encoders_own_reconstruction(tmp_path):
    model, clip = motion_model(), panning()
    for rule in (PFrameRule(), PFrameRule(rd_weight=1.0)):
        encoder = FrameEncoder(model, 3, gop=4, rule=rule)
        ours = []
        for frame in clip:
            ftype, _ = encoder.encode(frame)
            ours.append(encoder.motion.ref[: clip.shape[1], : clip.shape[2]].numpy())
        path, summary = _encoded(tmp_path, model, clip, rule=rule)
        header, frames = decode_stream(path, model)
        decoded = np.stack(list(frames))
        assert header.version == bs.VERSION_MOTION == 5 and decoded.shape == clip.shape
        assert np.array_equal(decoded, np.stack(ours))  # the decoder rebuilds exactly what the encoder predicted from
        assert summary["frames_by_type"] == {"I": 2, "P": 5}
        # the ideal code length (latents and vectors under the coder's tables) is what the file holds, framing aside
        assert summary["ideal_bpp"] <= summary["bpp"] < summary["ideal_bpp"] * 1.05 + 0.05


def test_random_access_into_a_motion_stream_gives_the_same_frames(tmp_path):
    model, clip = motion_model(), panning(9)
    path, _ = _encoded(tmp_path, model, clip, gop=4)
    _, frames = decode_stream(path, model)
    full = np.stack(list(frames))
    for start, count in ((5, 3), (4, 1), (8, 1), (1, 7)):
        _, part = decode_stream(path, model, start, count)
        assert np.array_equal(np.stack(list(part)), full[start : start + count]), (start, count)


def test_i_frames_of_a_motion_model_are_the_base_models(tmp_path):
    """``with_motion`` leaves every I-frame as it was: the same decoded I-frames (the chunks differ only by the
    checksum, keyed by a header that names another model)."""
    base = make_coding_model()
    clip = panning(5)
    a, b = tmp_path / "a.lvc", tmp_path / "b.lvc"
    encode_frames(iter(clip), a, base, 3, Fraction(25), 4)
    encode_frames(iter(clip), b, with_motion(base), 3, Fraction(25), 4)
    da, db = (np.stack(list(decode_stream(p, m)[1])) for p, m in ((a, base), (b, with_motion(base))))
    assert np.array_equal(da[0], db[0]) and np.array_equal(da[4], db[4])
    assert not np.array_equal(da[1], db[1])  # and the P-frames are another kind


def test_every_damaged_byte_of_a_motion_p_frame_is_refused(tmp_path):
    model, clip = motion_model(), panning(3)
    path, _ = _encoded(tmp_path, model, clip, gop=4)
    data = path.read_bytes()
    table = bs.chunk_table(data)
    p = table[1]
    refused = 0
    for i in range(p.payload_offset, p.end):
        for bit in (0x01, 0x80):
            bad = bytearray(data)
            bad[i] ^= bit
            broken = tmp_path / "bad.lvc"
            broken.write_bytes(bytes(bad))
            with pytest.raises(FedlvcError):
                _, frames = decode_stream(broken, model)
                list(frames)
            refused += 1
    assert refused == 2 * (p.end - p.payload_offset) > 0


def test_forged_vectors_out_of_range_are_refused_before_reconstruction(tmp_path):
    from common.motion.blocks import MAX_MV, MotionCounts
    from common.motion.residual import MotionPFrames

    model = motion_model()
    coder = MotionPFrames(model, 2)
    coder.reset(torch.zeros(32, 48, 3, dtype=torch.uint8))
    # a stream whose first vector difference is the largest the alphabet has, twice: |v| > MAX_MV
    import constriction

    ans = constriction.stream.stack.AnsCoder()
    probs = MotionCounts().probabilities()
    models = [constriction.stream.model.Categorical(p.astype(np.float32), perfect=False) for p in probs]
    diff = np.zeros((2, 3, 2), dtype=np.int64)
    diff[0, 0, 1] = diff[0, 1, 1] = MAX_MV
    for c in (1, 0):
        ans.encode_reverse(diff[..., c].reshape(-1).astype(np.int32) + 2 * MAX_MV, models[c])
    with pytest.raises(FedlvcError, match="motion vector out of range"):
        coder.unpack(ans.get_compressed().astype("<u4").tobytes(), (model.cfg.latent_channels, 2, 3), lambda y, d: 0)


def test_versions_and_models_are_kept_apart(tmp_path):
    base, motion = make_coding_model(), motion_model()
    clip = panning(3)
    m_path, _ = _encoded(tmp_path, motion, clip)
    with pytest.raises(FedlvcError, match="version 5 cannot be decoded"):
        decode_stream(m_path, base)
    b_path = tmp_path / "b.lvc"
    encode_frames(iter(clip), b_path, base, 3, Fraction(25), 4)
    with pytest.raises(FedlvcError, match="version 3 cannot be decoded"):
        decode_stream(b_path, motion)
    assert bs.readable_by(motion.cfg) == (5,) and bs.readable_by(base.cfg) == (1, 2, 3)


def test_the_motion_flag_is_part_of_the_config_and_fingerprint():
    from common.checkpoint import fingerprint

    base = make_coding_model()
    assert "motion" not in base.cfg.to_dict()  # older configs and fingerprints unchanged
    motion = with_motion(base)
    assert motion.cfg.to_dict()["motion"] is True and fingerprint(motion) != fingerprint(base)
    with pytest.raises(FedlvcError, match="motion needs architecture"):
        CodecConfig.from_dict(dict(CodecConfig(architecture="fedlvc-factorized-gain-v1").to_dict(), motion=True))
    with pytest.raises(FedlvcError, match="motion must be true or false"):
        CodecConfig.from_dict(dict(base.cfg.to_dict(), motion=1))


def test_training_the_motion_parts_moves_them_and_nothing_else():
    torch.manual_seed(0)
    model = with_motion(FedlvcCodec(CodecConfig(channels=8, latent_channels=8, mixtures=2))).train()
    with torch.no_grad():
        for g in (model.gain, model.res_gain):
            g.log_gain.weight.fill_(math.log(30.0))
        for g in (model.inv_gain, model.res_inv_gain):
            g.log_gain.weight.fill_(-math.log(30.0))
    params = set_trainable(model, 4, "motion")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("res_") for n in names) and len(params) == len(names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.from_numpy(panning(4, 32, 32)).permute(0, 3, 1, 2).float().div(255)[None].repeat(2, 1, 1, 1, 1)
    out = forward_segment(model, x, torch.tensor([1, 4]), PFrameRule(rd_weight=1.0))
    assert out["x_hat"].shape == x.shape and out["bits"].shape == (2,) and torch.isfinite(out["bits"]).all()
    loss = (out["x_hat"] - x).pow(2).mean() + out["bits"].mean() / (4 * 32 * 32)
    opt = torch.optim.Adam(params, lr=1e-2)
    loss.backward()
    opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= names and "res_prior.table.weight" in moved and any("res_g_s" in n for n in moved)
    # frame rows reach no residual part; nor does a motion model's segment training reach the latent P-frame prior
    set_trainable(model, 0)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith(("res_", "temporal.")))
    set_trainable(model, 4)
    assert not model.temporal.table.weight.requires_grad and model.res_g_a.layers[0].weight.requires_grad


def test_the_residual_codec_maps_zero_to_zero():
    """No biases in the residual transforms: a perfectly predicted frame has the zero residual latent, and the zero
    latent decodes to the prediction itself (nothing creeps into the frames of a group)."""
    model = motion_model()
    levels = torch.tensor([0, 3])
    with torch.no_grad():
        assert torch.equal(model.residual_analysis(torch.zeros(2, 3, 32, 48), levels), torch.zeros(2, 8, 2, 3))
        assert torch.equal(model.residual_synthesis(torch.zeros(2, 8, 2, 3), levels), torch.zeros(2, 3, 32, 48))
    assert all(m.bias is None for t in (model.res_g_a, model.res_g_s) for m in t.layers if hasattr(m, "bias"))


_CROSS_SCRIPT = """
import sys
from fractions import Fraction
import numpy as np, torch
from common.checkpoint import load_model
from common.codec import decode_stream, encode_frames
model_path, clip_path, mine, other = sys.argv[1:5]
model = load_model(model_path)
clip = np.load(clip_path)
print(torch.backends.cpu.get_cpu_capability())
for q in range(1, model.cfg.num_levels + 1):
    encode_frames(iter(clip), f"{mine}/q{q}.lvc", model, q, Fraction(25), gop=8)
    np.save(f"{mine}/own_q{q}.npy", np.stack(list(decode_stream(f"{mine}/q{q}.lvc", model)[1])))
    if other != "-":
        np.save(f"{mine}/decoded_q{q}.npy", np.stack(list(decode_stream(f"{other}/q{q}.lvc", model)[1])))
"""


@pytest.mark.slow
def test_motion_streams_decode_on_the_other_cpu_kernel_path(tmp_path):
    """Written with torch's scalar kernels and decoded with its AVX2 kernels, and the other way round, at every
    quality: every chunk parses and passes its checksum (what is parsed depends on decoded integers only); the
    frames, which run through the float synthesis and are carried by the prediction, stay within a few levels
    of what the writing machine decoded."""
    from common.checkpoint import save_model

    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("this CPU has no vector kernel path to compare with")
    model_path = tmp_path / "m.safetensors"
    save_model(model_path, motion_model())
    np.save(tmp_path / "clip.npy", panning(8, 40, 56))
    dirs = on_both_kernel_paths(tmp_path, _CROSS_SCRIPT, model_path, tmp_path / "clip.npy")
    worst = 0
    for q in range(1, motion_model().cfg.num_levels + 1):
        for mine, other in (("default", "avx2"), ("avx2", "default")):
            decoded, own = np.load(dirs[mine] / f"decoded_q{q}.npy"), np.load(dirs[other] / f"own_q{q}.npy")
            assert decoded.shape == own.shape == (8, 40, 56, 3)
            worst = max(worst, int(np.abs(decoded.astype(int) - own.astype(int)).max()))
    assert worst <= 4, worst


def test_streams_mixing_latent_and_motion_p_frames_round_trip(tmp_path, monkeypatch):
    """At a P position the encoder codes whichever of the two kinds costs less (a latent P-frame around the group's
    last latent, tried where most blocks stand still, or a motion-compensated one); both ends keep both states.
    Here the choice is forced to alternate, on a still clip, to check the mechanism whatever the model."""
    model = motion_model()
    clip = np.repeat(panning(1), 9, axis=0)  # a still camera: every block's vector is zero
    calls = []

    def alternate(self, frame, decoded, payload, ftype):  # the latent kind wins every other time it is tried
        calls.append(ftype)
        return 0.0 if (ftype == bs.FRAME_PREDICTED) == (self.state.index % 2 == 0) else 1.0

    monkeypatch.setattr(FrameEncoder, "_cost", alternate)
    # every block stands still (the test model's decoded frames are too rough for the search to say so itself)
    monkeypatch.setattr(
        "common.motion.residual.estimate",
        lambda cur, ref, lam: torch.zeros(*block_grid(*cur.shape[:2]), 2, dtype=torch.int64),
    )
    encoder = FrameEncoder(model, 3, gop=5, rule=PFrameRule(rd_weight=1.0))
    types, ours = [], []
    for frame in clip:
        ftype, _ = encoder.encode(frame)
        types.append(ftype)
        ours.append(encoder.motion.ref[: clip.shape[1], : clip.shape[2]].numpy())
    assert types == [0, 2, 1, 2, 1, 0, 1, 2, 1]  # I, M, P, ... (index 6 even: latent wins)
    assert bs.FRAME_MOTION in calls and bs.FRAME_PREDICTED in calls
    path, summary = _encoded(tmp_path, model, clip, gop=5, rule=PFrameRule(rd_weight=1.0))
    assert [c.frame_type for c in bs.chunk_table(path.read_bytes())] == types
    assert summary["motion_frames"] == 3 and summary["frames_by_type"] == {"I": 2, "P": 7}
    _, frames = decode_stream(path, model)
    full = np.stack(list(frames))
    assert np.array_equal(full, np.stack(ours))
    for start in (3, 6, 8):
        _, part = decode_stream(path, model, start, 2)
        assert np.array_equal(np.stack(list(part)), full[start : start + 2])


def test_a_motion_frame_stands_only_at_a_p_position():
    import io

    raw = bs.pack_chunk(b"abcdefgh", bs.FRAME_MOTION, bs.VERSION_MOTION)
    assert bs.read_frame_chunk(io.BytesIO(raw), 1, len(raw), 4096, 0, bs.FRAME_PREDICTED, 5)[2] == bs.FRAME_MOTION
    with pytest.raises(FedlvcError, match="frame type M where the group structure puts type I"):
        bs.read_chunk(io.BytesIO(raw), 0, len(raw), 4096, 0, bs.FRAME_INTRA, 5)  # M at an I position
    v3 = bs.pack_chunk(b"abcdefgh", bs.FRAME_PREDICTED, 3)
    assert bs.read_frame_chunk(io.BytesIO(v3), 1, len(v3), 4096, 0, bs.FRAME_PREDICTED, 3)[2] == bs.FRAME_PREDICTED


MOTION_WIP = Path(__file__).resolve().parents[1] / "common" / "pretrained" / "motion" / "fedlvc-motion-wip.safetensors"


def test_a_translating_real_picture_costs_a_third_with_motion(carphone_path, default_model):
    """Issue 16's yardstick: a picture from a real camera (carphone's first frame, upscaled 2x) translated by
    (1, 3) pixels a frame, coded by the shipped model (latent P-frames) and by the committed motion model (the same
    model with the trained motion parts), every quality. At equal PSNR (BD-rate over the P-frames' bytes) the
    motion-compensated P-frames cost under 35 % of the latent ones (measured: 31 %; the issue's goal of 25 % is
    not reached yet)."""
    from PIL import Image

    from common.checkpoint import load_model
    from common.data.video import read_frames
    from common.eval.evaluate import code_and_measure
    from common.eval.metrics import bd_rate

    big = np.asarray(Image.fromarray(read_frames(carphone_path, 1)[0]).resize((352, 288), Image.BICUBIC))
    clip = np.stack([big[40 + i : 168 + i, 20 + 3 * i : 180 + 3 * i] for i in range(12)])
    motion = load_model(MOTION_WIP)
    curves = {}
    for name, model in (("latent", default_model), ("motion", motion)):
        points = []
        for q in range(1, model.cfg.num_levels + 1):
            m, _ = code_and_measure(clip, model, q, 25, 32, None, None)
            points.append((m["summary"]["chunk_bytes_by_type"]["P"], m["psnr"]))
        curves[name] = points
    assert bd_rate(curves["latent"], curves["motion"]) <= -65.0, curves
