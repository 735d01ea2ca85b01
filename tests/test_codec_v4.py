"""Architecture v4 (common.net.hyperprior, common.coding.hypercoder): GDN and the mean-scale hyperprior, the integer
hyper-synthesis and coding tables stored with the model, bitstream version 4, exact decoding on another CPU
kernel path."""

from __future__ import annotations

import io
import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from client.cli import main
from common.checkpoint import fingerprint, load_model, save_model
from common.codec import FrameDecoder, FrameEncoder, decompress_file, encode_frames
from common.coding import bitstream as bs
from common.coding.hypercoder import TABLE_TOTAL, coding_tables
from common.errors import FedlvcError
from common.net.architecture import CodecConfig
from common.net.hyperprior import ACT_BITS, LOG_SCALE_MAX, LOG_SCALE_MIN, SCALE_LOG0, SCALE_LOG_STEP, table_index
from common.net.model import FedlvcCodec
from tests.conftest import on_both_kernel_paths

CFG = CodecConfig.v4(channels=16, latent_channels=16, hyper_channels=12, mixtures=2)


def make_v4(seed: int = 0) -> FedlvcCodec:
    """A small v4 model whose hyperprior spreads over many scales and means (as a trained one does)."""
    torch.manual_seed(seed)
    model = FedlvcCodec(CFG)
    with torch.no_grad():
        model.gain.log_gain.weight.add_(math.log(8.0))
        model.inv_gain.log_gain.weight.sub_(math.log(8.0))
        model.h_s.out.weight.mul_(20.0)
        model.h_s.out.bias.normal_(0, 1.5)
    return model.eval()


def frames(n: int = 5, h: int = 40, w: int = 56, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h + n, w + n, 3), dtype=np.uint8)
    return np.stack([base[i : i + h, i : i + w] for i in range(n)])


def test_integer_hyper_synthesis_follows_the_float_path():
    model = make_v4()
    z = torch.randint(-6, 7, (1, CFG.hyper_channels, 3, 4)).double()
    mean_f, log_scale_f = model.h_s(z.float(), (11, 14))
    mean_q, log_scale_q = model.h_s.integer_forward(z, (11, 14))
    assert torch.equal(mean_q, mean_q.round()) and torch.equal(log_scale_q, log_scale_q.round())  # integers
    # Rounding weights to 2^-14 and activations to 2^-10: a fraction of a percent of the outputs' range.
    mean_f, log_scale_f = mean_f.detach().double(), log_scale_f.detach().double()
    assert (mean_q / 2**ACT_BITS - mean_f).abs().max() < 0.005 * mean_f.abs().max()
    clamped = (log_scale_q / 2**ACT_BITS).clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)
    assert (clamped - log_scale_f).abs().max() < 0.005 * log_scale_f.abs().max()
    table, offset = table_index(mean_q, log_scale_q)
    nearest = ((log_scale_f * 2**ACT_BITS - SCALE_LOG0) / SCALE_LOG_STEP).round().clamp(0, 63)
    assert (table // 8 == nearest).float().mean() > 0.97  # the same scale, but at rounding boundaries
    assert len(torch.unique(table)) > 50  # the test model really spreads over the tables
    assert torch.equal(offset.double(), torch.floor(mean_q / 2**ACT_BITS))


def test_tables_are_integers_stored_with_the_model_and_out_of_fedavg(tmp_path):
    model = make_v4()
    tables = coding_tables(model)
    assert all(t.sum() == TABLE_TOTAL and t.min() >= 1 for t in tables.gauss)
    assert (tables.z.sum(-1) == TABLE_TOTAL).all()
    assert not any(k.startswith("tables.") for k in model.state_dict())  # what a site sends and FedAvg averages
    path = tmp_path / "v4.safetensors"
    save_model(path, model)
    stored = load_file(str(path))
    assert stored["tables.gauss_counts"].dtype == torch.int32 and stored["tables.z_counts"].dtype == torch.int32
    loaded = load_model(path)
    assert fingerprint(loaded) == fingerprint(model)
    assert np.array_equal(coding_tables(loaded).z, tables.z)
    # Training moves the hyper-latent prior: the tables follow it.
    with torch.no_grad():
        loaded.z_prior.table.weight[0, 0] += 1.0
    assert not np.array_equal(coding_tables(loaded).z, tables.z)


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda s: s["tables.gauss_counts"].__setitem__(7, s["tables.gauss_counts"][7] + 1), "damaged"),
        (lambda s: s["tables.z_counts"].__setitem__((0, 0, 0), 0), "damaged"),
        (lambda s: s.pop("tables.z_counts"), "missing"),
        (lambda s: s["tables.source"].__setitem__(0, s["tables.source"][0] ^ 1), "other weights"),
    ],
)
def test_damaged_tables_are_refused(tmp_path, damage, message):
    path = tmp_path / "v4.safetensors"
    save_model(path, make_v4())
    state = dict(load_file(str(path)))
    damage(state)
    save_file(state, str(path))
    with pytest.raises(FedlvcError, match=message):
        load_model(path)


def test_v4_streams_round_trip_with_version_4_and_their_ideal_size(tmp_path):
    model = make_v4()
    path = tmp_path / "v4.safetensors"
    save_model(path, model)
    model = load_model(path)
    clip = frames(6)
    for quality, gop in [(1, 1), (4, 3), (7, 6)]:
        out = tmp_path / f"q{quality}.lvc"
        stats = encode_frames(iter(clip), out, model, quality, Fraction(25), gop=gop)
        data = out.read_bytes()
        assert data[4] == bs.VERSION_HYPER == 4
        header = bs.read_header(io.BytesIO(data), len(data))
        assert header.version == 4 and header.gop == gop
        decompress_file(out, tmp_path / f"q{quality}.mkv", model)
        enc = FrameEncoder(model, quality, track_bits=True, gop=gop)
        dec = FrameDecoder(model, quality, 40, 56, gop=gop, version=4)
        payload_bits = 0
        for f in clip:
            ftype, payload = enc.encode(f)
            assert np.array_equal(dec.decode_latent(payload), enc.state.prev)  # what the encoder coded
            payload_bits += 8 * len(payload)
        # The payloads cost their ideal bits plus at most two 32-bit words each (check value, coder state).
        assert enc.ideal_bits <= payload_bits <= enc.ideal_bits + 64 * len(clip) + 8
        assert stats["bytes"] == len(data)


def test_a_v4_stream_needs_a_v4_model_and_the_other_way_round(tmp_path):
    from common.checkpoint import load_model as load

    v4 = make_v4()
    encode_frames(iter(frames(2)), tmp_path / "a.lvc", v4, 2, Fraction(25))
    v3 = load(None)
    with pytest.raises(FedlvcError, match="bitstream version 4 cannot be decoded with a model of architecture"):
        decompress_file(tmp_path / "a.lvc", tmp_path / "a.mp4", v3)
    encode_frames(iter(frames(2)), tmp_path / "b.lvc", v3, 2, Fraction(25))
    with pytest.raises(FedlvcError, match="bitstream version 3 cannot be decoded"):
        decompress_file(tmp_path / "b.lvc", tmp_path / "b.mp4", v4)
    assert not (tmp_path / "a.mp4").exists() and not (tmp_path / "b.mp4").exists()


def test_damaged_v4_payloads_are_refused():
    model = make_v4()
    enc = FrameEncoder(model, 5, gop=2)
    payloads = [enc.encode(f)[1] for f in frames(2)]
    rng = np.random.default_rng(0)
    refused = 0
    for _ in range(40):
        dec = FrameDecoder(model, 5, 40, 56, gop=2, version=4)
        data = bytearray(payloads[0])
        pos = int(rng.integers(0, len(data)))
        data[pos] ^= 1 << int(rng.integers(0, 8))
        try:
            dec.decode_latent(bytes(data))
        except FedlvcError:
            refused += 1
    assert refused == 40


_CROSS_SCRIPT = """
import io, sys
from fractions import Fraction
import numpy as np, torch
from common.coding import bitstream as bs
from common.checkpoint import load_model
from common.codec import DEFAULT_P_RULE, FrameDecoder, FrameEncoder, encode_frames
model_path, clip_path, mine, other = sys.argv[1:5]
model = load_model(model_path)
clip = np.load(clip_path)
print(torch.backends.cpu.get_cpu_capability())
for q in range(1, model.cfg.num_levels + 1):
    encode_frames(iter(clip), f"{mine}/q{q}.lvc", model, q, Fraction(25), gop=3)
    enc = FrameEncoder(model, q, gop=3, rule=DEFAULT_P_RULE)  # the latents this process coded
    coded = []
    for f in clip:
        enc.encode(f)
        coded.append(enc.state.prev)
    np.save(f"{mine}/coded_q{q}.npy", np.stack(coded))
    if other != "-":
        data = open(f"{other}/q{q}.lvc", "rb").read()
        h = bs.read_header(io.BytesIO(data), len(data))
        dec = FrameDecoder(model, q, h.height, h.width, h.gop, h.version, h.stream_key)
        payloads = [data[c.payload_offset : c.end] for c in bs.chunk_table(data)]
        np.save(f"{mine}/decoded_q{q}.npy", np.stack([dec.decode_latent(p + bytes(-len(p) % 4)) for p in payloads]))
"""


@pytest.mark.slow
def test_v4_streams_decode_exactly_on_the_other_cpu_kernel_path(tmp_path):
    """Written with torch's scalar kernels and decoded with its AVX2 kernels, and the other way round, at every
    quality: every latent decodes to exactly what the other process's encoder coded (the checksums pass)."""
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("this CPU has no vector kernel path to compare with")
    model_path = tmp_path / "v4.safetensors"
    save_model(model_path, make_v4())
    np.save(tmp_path / "clip.npy", frames(4, 72, 88, seed=3))
    dirs = on_both_kernel_paths(tmp_path, _CROSS_SCRIPT, model_path, tmp_path / "clip.npy")
    for q in range(1, CFG.num_levels + 1):
        for mine, other in (("default", "avx2"), ("avx2", "default")):
            decoded, coded = np.load(dirs[mine] / f"decoded_q{q}.npy"), np.load(dirs[other] / f"coded_q{q}.npy")
            assert decoded.shape == (4, 16, 5, 6) and np.array_equal(decoded, coded), (q, mine)


def test_fedlvc_train_builds_a_v4_model_that_compresses(tmp_path, capsys):
    from common.data.video import write_video

    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(2):
        write_video(videos / f"v{i}.mkv", frames(6, 64, 64, seed=i), Fraction(25))
    out = tmp_path / "m.safetensors"
    args = ["train", str(videos), "--out", str(out), "--architecture", "v4", "--steps", "3", "--batch-size", "2"]
    assert main([*args, "--crop-size", "32", "--validate-every", "3", "--quiet"]) == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["config"]["architecture"] == "fedlvc-hyperprior-gdn-v4"
    model = load_model(out)
    assert all((m.conv.weight >= 0).all() for m in model.modules() if type(m).__name__ == "GDN")
    lvc = tmp_path / "a.lvc"
    assert main(["compress", str(videos / "v0.mkv"), str(lvc), "--model", str(out), "--quality", "3"]) == 0
    assert main(["decompress", str(lvc), str(tmp_path / "a.mkv"), "--model", str(out)]) == 0
    assert lvc.read_bytes()[4] == 4


def test_an_encoder_never_writes_a_latent_its_decoder_refuses():
    """Means near the edge of the support: the latent is clipped to what the decoder accepts and round-trips;
    means beyond it (a broken or hostile model): one clear error, no stream."""
    model = make_v4()
    m = CFG.latent_channels
    with torch.no_grad():
        model.h_s.out.bias[:m] = 250.0  # every mean near +support (255)
    enc = FrameEncoder(model, 4)
    _, payload = enc.encode(frames(1)[0])
    assert enc.state.prev.max() <= 255
    assert np.array_equal(FrameDecoder(model, 4, 40, 56, version=4).decode_latent(payload), enc.state.prev)
    with torch.no_grad():
        model.h_s.out.bias[:m] = 2000.0
    with pytest.raises(FedlvcError, match="out of range"):
        FrameEncoder(model, 4).encode(frames(1)[0])
