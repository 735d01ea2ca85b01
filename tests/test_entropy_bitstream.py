"""Entropy coding (LatentCoders, ANS) and the .lvc container header (StreamHeader / read_header)."""

from __future__ import annotations

import io
import math
import os
import struct
import subprocess
import sys
import zlib
from fractions import Fraction

import numpy as np
import pytest
import torch
from conftest import allocates_at_most, make_coding_model, make_tiny_model

from common.checkpoint import load_model
from common.codec import FrameEncoder, _to_tensor
from common.coding import bitstream as bs
from common.coding.entropy import LatentCoders, coding_fingerprint
from common.coding.latent import Condition
from common.data.clips import generate_site_clip
from common.errors import FedlvcError

# constriction's ANS coder flushes a 64-bit state and works in 32-bit words: a constant overhead of at most
# about 64 bits on top of the ideal code length, whatever the frame size.
ANS_OVERHEAD_BITS = 64


def coding_model():
    return make_coding_model(0)


@pytest.fixture(scope="module")
def big_frame() -> np.ndarray:
    return next(iter(generate_site_clip(3, 0, 256, 192, 1)))


# -------------------------------------------------------------------------------------------- LatentCoders


@pytest.mark.parametrize("level", range(6))
def test_latent_coder_round_trip_is_exact(level):
    model = make_tiny_model(0)
    coder = LatentCoders(model)
    rng = np.random.default_rng(level)
    y = np.rint(rng.normal(0, 2.0, (model.cfg.latent_channels, 5, 7))).astype(np.int64)
    payload = coder.payload(y, Condition(level))
    assert isinstance(payload, bytes) and len(payload) % 4 == 0 and len(payload) > 0
    out = coder.latent(payload, Condition(level), y.shape)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, y)


def test_latent_coder_round_trip_of_extreme_symbols_clips_to_support():
    model = make_tiny_model(0)
    coder = LatentCoders(model)
    r = model.cfg.support
    rng = np.random.default_rng(7)
    y = rng.choice([-r - 40, -r, -r + 1, -1, 0, 2, r - 1, r, r + 1000], size=(model.cfg.latent_channels, 3, 4))
    out = coder.latent(coder.payload(y, Condition(2)), Condition(2), y.shape)
    np.testing.assert_array_equal(out, np.clip(y, -r, r))


def test_latent_coder_pmf_is_normalised():
    model = make_tiny_model(0)
    coder = LatentCoders(model)
    for level in range(model.cfg.num_levels):
        pmf = coder.intra.pmf(level)
        assert pmf.shape == (model.cfg.latent_channels, 2 * model.cfg.support + 1)
        assert pmf.dtype == np.float64 and (pmf >= 0).all()
        np.testing.assert_allclose(pmf.sum(1), 1.0, rtol=1e-12)


def test_latent_coder_decode_rejects_wrong_payloads():
    model = make_tiny_model(0)
    coder = LatentCoders(model)
    y = np.zeros((model.cfg.latent_channels, 2, 2), dtype=np.int64)
    y[0, 0, 0] = 3
    payload = coder.payload(y, Condition(1))
    with pytest.raises(FedlvcError, match="32-bit words"):
        coder.latent(payload + b"\x00", Condition(1), y.shape)
    with pytest.raises(FedlvcError):
        coder.latent(payload + b"\x01\x02\x03\x04" * 4, Condition(1), y.shape)  # data left over


@pytest.mark.parametrize("quality", range(1, 7))
def test_coded_size_matches_ideal_bits(big_frame, quality):
    model = coding_model()
    encoder = FrameEncoder(model, quality, track_bits=True)
    y_hat = encoder.latent(big_frame)
    assert np.unique(y_hat).size >= 10, "latents too degenerate for a meaningful rate check"
    _, payload = encoder.encode(big_frame)
    ideal = encoder.ideal_bits
    assert math.isfinite(ideal) and ideal > 5000
    bits = len(payload) * 8
    assert abs(bits - ideal) <= 0.01 * ideal + ANS_OVERHEAD_BITS, (bits, ideal)
    # And the payload really decodes back to the same latent.
    check = lambda y: bs.latent_checksum(y, 0, 0)  # noqa: E731 - frame 0 of a stream with key 0
    np.testing.assert_array_equal(encoder.coders.latent(payload, Condition(quality - 1), y_hat.shape, check), y_hat)


@pytest.mark.parametrize("quality", [1, 3, 6])
def test_coding_tables_agree_with_training_rate(big_frame, quality):
    """The coding tables' −Σlog2 p equals the eval-mode training path's −Σlog2 likelihood."""
    model = coding_model()
    encoder = FrameEncoder(model, quality, track_bits=True)
    encoder.encode(big_frame)
    x = _to_tensor(big_frame, model.cfg.stride)
    with torch.no_grad():
        out = model(x, torch.tensor([quality - 1]))
    training_bits = -torch.log2(out["likelihoods"].double()).sum().item()
    assert encoder.ideal_bits == pytest.approx(training_bits, rel=1e-3)


def test_default_model_coded_size_matches_ideal_and_training_rate(default_model, big_frame):
    for quality in (1, default_model.cfg.num_levels):
        encoder = FrameEncoder(default_model, quality, track_bits=True)
        _, payload = encoder.encode(big_frame)
        ideal = encoder.ideal_bits
        assert math.isfinite(ideal) and ideal > 0
        assert abs(len(payload) * 8 - ideal) <= 0.01 * ideal + ANS_OVERHEAD_BITS
        with torch.no_grad():
            out = default_model(_to_tensor(big_frame, 16), torch.tensor([quality - 1]))
        assert ideal == pytest.approx(-torch.log2(out["likelihoods"].double()).sum().item(), rel=1e-2)


def test_higher_quality_spends_more_bits(big_frame):
    model = coding_model()
    sizes = [len(FrameEncoder(model, q).encode(big_frame)[1]) for q in range(1, model.cfg.num_levels + 1)]
    assert sizes[-1] > sizes[0], sizes


# ------------------------------------------------------------------------------------------- StreamHeader


def header(**kw) -> bs.StreamHeader:
    args = dict(
        fingerprint=bytes(range(16)), quality=3, width=70, height=45, fps=Fraction(30000, 1001), frames=10, gop=1
    )
    args.update(kw)
    return bs.StreamHeader(**args)


def read(raw: bytes, file_size: int | None = None) -> bs.StreamHeader:
    return bs.read_header(io.BytesIO(raw), len(raw) if file_size is None else file_size)


def recrc(raw: bytes) -> bytes:
    body = raw[: bs.HEADER.size]
    return body + struct.pack(">I", zlib.crc32(body)) + raw[bs.HEADER_SIZE :]


def test_header_size_and_layout():
    raw = header().pack()
    assert len(raw) == bs.HEADER_SIZE == 49
    assert raw[:4] == b"FLVC" and raw[4] == bs.VERSION == 3
    assert struct.unpack(">I", raw[-4:])[0] == zlib.crc32(raw[:-4])


@pytest.mark.parametrize("fps", [Fraction(25), Fraction(30000, 1001), Fraction(24000, 1001), Fraction(1, 2)])
def test_header_round_trip(fps):
    h = header(fps=fps, frames=7, width=1921, height=1081, quality=6)
    raw = h.pack()
    got = read(raw, file_size=len(raw) + 7 * (bs.CHUNK.size + 4))
    assert got == h
    assert got.fps == fps and isinstance(got.fps, Fraction)


def test_header_reader_stops_after_header():
    h = header(frames=1)
    f = io.BytesIO(h.pack() + b"\x00" * 13)
    bs.read_header(f, len(f.getvalue()))
    assert f.tell() == bs.HEADER_SIZE


def _refused(raw: bytes, match: str, file_size: int | None = None) -> str:
    with allocates_at_most(1 << 20), pytest.raises(FedlvcError, match=match) as e:  # refused up front
        read(raw, file_size)
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


def test_read_header_refuses_bad_magic():
    raw = header().pack() + bytes(200)
    _refused(b"XLVC" + raw[4:], "magic")
    _refused(b"\x1aE\xdf\xa3" + bytes(100), "magic")  # a Matroska file
    _refused(b"FL", "magic")
    _refused(b"", "magic")


def test_read_header_refuses_truncated_header():
    raw = header().pack()
    for cut in (4, 10, 30, bs.HEADER_SIZE - 1):
        _refused(raw[:cut], "truncated")


def test_read_header_refuses_other_version():
    raw = header(version=6).pack() + bytes(200)
    msg = _refused(raw, "version")
    assert "6" in msg and "1, 2, 3, 4, 5" in msg


def test_read_header_refuses_crc_mismatch():
    raw = bytearray(header().pack() + bytes(200))
    raw[20] ^= 0x01  # inside the fingerprint
    _refused(bytes(raw), "checksum")
    raw = bytearray(header().pack() + bytes(200))
    raw[bs.HEADER.size] ^= 0x80  # the CRC itself
    _refused(bytes(raw), "checksum")


def test_read_header_refuses_unknown_flags():
    raw = bytearray(header().pack() + bytes(200))
    raw[5] = 1
    _refused(recrc(bytes(raw)), "flags")


@pytest.mark.parametrize(
    "width,height", [(100000, 100000), (0, 45), (70, 0), (16385, 16), (16384, 16384), (2**32 - 1, 2**32 - 1)]
)
def test_read_header_refuses_absurd_size(width, height):
    raw = header(width=width, height=height).pack() + bytes(1000)
    msg = _refused(raw, "frame size")
    assert f"{width}x{height}" in msg


def test_read_header_accepts_largest_size():
    raw = header(width=8192, height=8192, frames=1).pack() + bytes(13)
    assert read(raw).width == 8192


@pytest.mark.parametrize("frames", [4_000_000_000, 2**32 - 1, bs.MAX_FRAMES + 1])
def test_read_header_refuses_absurd_frame_count(frames):
    raw = header(frames=frames).pack() + bytes(1000)
    msg = _refused(raw, "frames")
    assert str(frames) in msg


@pytest.mark.parametrize("version", [2, 3])
def test_read_header_refuses_more_frames_than_the_file_can_hold(version):
    per_frame = bs.CHUNK.size + 4 if version == 2 else 1  # the smallest possible chunk
    assert bs.min_chunk_bytes(version) == per_frame
    raw = header(frames=10, version=version).pack()
    body = bytes(10 * per_frame)
    assert read(raw + body).frames == 10
    _refused(raw + body[:-1], "frames")
    _refused(raw, "frames")
    # The file's real size counts, not the bytes handed over.
    _refused(raw + body, "frames", file_size=len(raw) + 9 * per_frame)


def test_read_header_refuses_zero_fps_and_zero_gop():
    raw = bytearray(header().pack())
    struct.pack_into(">I", raw, 4 + 1 + 1 + 16 + 1 + 4 + 4, 0)  # fps_num
    _refused(recrc(bytes(raw)) + bytes(200), "frame rate")
    _refused(header(gop=0).pack() + bytes(200), "group-of-pictures")


# ------------------------------------------------------------------------------------------------ chunks


def test_chunk_round_trip_and_refusals():
    """Version 3 chunks: a varint head (length × 2 + type), the payload words with the top word's zero high
    bytes left out; read back as the same whole words."""
    words = [b"", b"abcd", b"\x01\x02\x00\x00", bytes(8), bytes(range(256)) * 4, b"wxyz\x00\x00\x00\x05"]
    stored = [0, 4, 2, 5, 1024, 8]  # payload bytes on disk (the last word keeps at least one byte)
    types = [bs.FRAME_INTRA, bs.FRAME_PREDICTED] * 3
    f = io.BytesIO()
    sizes = [bs.write_chunk(f, w, t) for w, t in zip(words, types)]
    assert sizes == [1 + n if 2 * n + 1 < 128 else 2 + n for n in stored]
    assert sizes == [bs.chunk_size(w, t) for w, t in zip(words, types)]
    data = f.getvalue()
    assert data[0] == 0 and data[1] == 2 * 4 + 1 and data[2:6] == b"abcd"
    f = io.BytesIO(data)
    remaining = len(data)
    for i, (w, t, size) in enumerate(zip(words, types, sizes)):
        got, n = bs.read_chunk(f, i, remaining, max_payload=4096, expected_type=t)
        assert got == w and n == size
        remaining -= n
    assert remaining == 0

    raw = bs.pack_chunk(b"abcdefgh", bs.FRAME_INTRA)
    with pytest.raises(FedlvcError, match="truncated"):
        bs.read_chunk(io.BytesIO(b""), 0, 0, 4096)
    big = bs.pack_chunk(b"\x01" * 400, bs.FRAME_INTRA)
    assert len(big) == 402
    with pytest.raises(FedlvcError, match="truncated"):  # cut inside a two-byte head
        bs.read_chunk(io.BytesIO(big[:1]), 0, 1, 4096)
    with pytest.raises(FedlvcError, match="truncated"):
        bs.read_chunk(io.BytesIO(raw[:-1]), 0, len(raw) - 1, 4096)
    with pytest.raises(FedlvcError, match="impossible payload size"):
        bs.read_chunk(io.BytesIO(raw), 0, len(raw), max_payload=4)
    with pytest.raises(FedlvcError, match="frame type"):
        bs.read_chunk(io.BytesIO(raw), 0, len(raw), 4096, expected_type=bs.FRAME_PREDICTED)
    for head in (b"\x90\x00", b"\x80" * 5 + b"\x01", b"\xff" * 6):  # not shortest form; over 5 bytes
        with pytest.raises(FedlvcError, match="malformed chunk head"):
            bs.read_chunk(io.BytesIO(head + bytes(100)), 0, len(head) + 100, 4096)
    huge = bytes([0xFE, 0xFF, 0xFF, 0xFF, 0x0F])  # 2**35 - 2: a payload of 2**34 - 1 bytes
    with allocates_at_most(1 << 20), pytest.raises(FedlvcError, match="impossible payload size"):
        bs.read_chunk(io.BytesIO(huge), 0, len(huge), max_payload=10**6)
    with pytest.raises(ValueError):
        bs.pack_chunk(b"abc", bs.FRAME_INTRA)


def test_version_2_chunks_are_read_with_their_payload_checksum():
    payloads = [b"", b"abcd", bytes(range(256)) * 4]
    key = 12345
    data = b"".join(bs.CHUNK.pack(0, len(p), bs.chunk_crc(p, i, key)) + p for i, p in enumerate(payloads))
    f = io.BytesIO(data)
    remaining = len(data)
    for i, p in enumerate(payloads):
        got, n = bs.read_chunk(f, i, remaining, 4096, key, version=2)
        assert got == p and n == bs.CHUNK.size + len(p)
        remaining -= n
    raw = data[: bs.CHUNK.size + 0]
    with pytest.raises(FedlvcError, match="truncated"):
        bs.read_chunk(io.BytesIO(raw[:5]), 0, 5, 4096, key, version=2)
    one = bytearray(bs.CHUNK.pack(0, 8, bs.chunk_crc(b"abcdefgh", 3, key)) + b"abcdefgh")
    assert bs.read_chunk(io.BytesIO(bytes(one)), 3, len(one), 4096, key, version=2)[0] == b"abcdefgh"
    with pytest.raises(FedlvcError, match="checksum"):
        bs.read_chunk(io.BytesIO(bytes(one)), 2, len(one), 4096, key, version=2)  # another position
    one[-1] ^= 1
    with pytest.raises(FedlvcError, match="checksum"):
        bs.read_chunk(io.BytesIO(bytes(one)), 3, len(one), 4096, key, version=2)
    one = bs.CHUNK.pack(7, 8, 0) + b"abcdefgh"
    with pytest.raises(FedlvcError, match="frame type"):
        bs.read_chunk(io.BytesIO(one), 0, len(one), 4096, key, version=2)
    one = bs.CHUNK.pack(0, 6, 0) + b"abcdef"
    with pytest.raises(FedlvcError, match="impossible payload size"):  # not whole words
        bs.read_chunk(io.BytesIO(one), 0, len(one), 4096, key, version=2)
    huge = struct.pack(">BII", 0, 2**32 - 4, 0)
    with pytest.raises(FedlvcError, match="impossible payload size"):
        bs.read_chunk(io.BytesIO(huge), 0, len(huge), max_payload=10**6, version=2)


def test_latent_coder_decode_rejects_a_shape_larger_than_encoded():
    model = make_coding_model(0)
    coder = LatentCoders(model)
    y = np.rint(np.random.default_rng(0).normal(0, 2.0, (model.cfg.latent_channels, 3, 5))).astype(np.int64)
    payload = coder.payload(y, Condition(3))
    with pytest.raises(FedlvcError):
        coder.latent(payload, Condition(3), (model.cfg.latent_channels, 4, 5))


def test_latent_coder_decode_rejects_a_shape_smaller_than_encoded():
    model = make_coding_model(0)
    coder = LatentCoders(model)
    y = np.rint(np.random.default_rng(0).normal(0, 2.0, (model.cfg.latent_channels, 3, 5))).astype(np.int64)
    payload = coder.payload(y, Condition(3))
    with pytest.raises(FedlvcError, match="frame size in the header|left over|damaged"):
        coder.latent(payload, Condition(3), (model.cfg.latent_channels, 2, 5))


# ------------------------------------------------------------------------------------ portability of tables

_TABLES_SCRIPT = """
import torch
from common.checkpoint import load_model
from common.coding.entropy import coding_fingerprint
print(torch.backends.cpu.get_cpu_capability(), coding_fingerprint(load_model(None)))
"""


def test_coding_fingerprint_sees_every_table():
    """The fingerprint is reproducible, and moves when one I-frame table or one P-frame scale changes."""
    model = make_coding_model(0)
    base = coding_fingerprint(model)
    assert base == coding_fingerprint(make_coding_model(0))
    with torch.no_grad():
        model.temporal.table.weight[5, 3] += 0.5  # one (level, channel × context) scale
    moved_p = coding_fingerprint(model)
    with torch.no_grad():
        model.prior.table.weight[2, 7] += 0.5  # one (level, channel × mixture) parameter
    assert len({base, moved_p, coding_fingerprint(model)}) == 3


@pytest.mark.slow
def test_coding_tables_are_the_same_under_each_cpu_kernel_path():
    """The shipped model's float64 tables computed with torch's scalar kernels and with its vector (AVX2)
    kernels, in fresh processes: whatever their last bits, the coder makes the same of every symbol under
    every I- and P-frame table, so a stream written on one path decodes on the other."""
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("this CPU has no vector kernel path to compare with")
    results = {}
    for path in ("default", "avx2"):
        env = dict(os.environ, ATEN_CPU_CAPABILITY=path)
        out = subprocess.run(
            [sys.executable, "-c", _TABLES_SCRIPT], env=env, capture_output=True, text=True, check=True
        ).stdout.split()
        results[path] = out
    assert [results[p][0] for p in ("default", "avx2")] == ["DEFAULT", "AVX2"]  # each path really ran
    assert results["default"][1] == results["avx2"][1] == coding_fingerprint(load_model(None))
