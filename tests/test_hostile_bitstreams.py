"""Property-based mutation tests: any damage to a ``.lvc`` file gives FedlvcError (the CLI's one-line error),
never another exception, garbage frames, or unbounded work."""

from __future__ import annotations

import zlib
from fractions import Fraction

import pytest
import torch
from conftest import allocates_at_most
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.codec import decode_stream, encode_frames
from common.coding import bitstream as bs
from common.data.clips import generate_site_clip
from common.errors import FedlvcError
from common.net.architecture import CodecConfig
from common.net.model import FedlvcCodec


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = FedlvcCodec(CodecConfig(channels=8, latent_channels=8, mixtures=2)).eval()
    with torch.no_grad():  # coarse gains would round every latent to 0: make the payloads carry real symbols
        model.gain.log_gain.weight.fill_(5.0)
        model.inv_gain.log_gain.weight.fill_(-5.0)
        # P-frame scales that differ per context, so a P payload decoded under a wrong context goes astray
        model.temporal.table.weight.copy_(torch.rand(model.temporal.table.weight.shape) * 3 - 2)
    return model


# gop 1: three I-frames; gop 3: I P P I P (P-frames coded against the two previous latents, random access).
STREAMS = {"gop1": (1, 3), "gop3": (3, 5)}


@pytest.fixture(scope="module", params=sorted(STREAMS))
def stream(request, model, tmp_path_factory):
    gop, count = STREAMS[request.param]
    path = tmp_path_factory.mktemp("hostile") / f"{request.param}.lvc"
    frames = list(generate_site_clip(1, 0, 48, 32, count))
    summary = encode_frames(iter(frames), path, model, 3, Fraction(25), gop=gop)
    assert summary["frames_by_type"]["P"] == count - -(-count // gop)
    data = path.read_bytes()
    table = bs.chunk_table(data)
    assert table[-1].end == len(data)
    assert all(c.length > 4 for c in table)  # every payload carries symbols besides the latent checksum
    assert [c.frame_type for c in table] == [bs.frame_type_at(i, gop) for i in range(count)]
    return model, data


@pytest.fixture(scope="module")
def decoded(stream, tmp_path_factory):
    """The frames of the undamaged stream."""
    model, data = stream
    return _decode(model, data, tmp_path_factory.mktemp("hostile_ok"))


def _decode(model, data: bytes, tmp_path, start: int = 0) -> list:
    path = tmp_path / "x.lvc"
    path.write_bytes(data)
    _, frames = decode_stream(path, model, start)
    return list(frames)


def _must_fail_cleanly(model, data, tmp_path, original):
    try:
        with allocates_at_most(64 << 20):  # what a forged size could make the decoder allocate or read
            frames = _decode(model, data, tmp_path)
    except FedlvcError:
        frames = None
    if frames is not None:
        # Only a mutation that leaves the meaningful bytes intact may decode, and then to the same frames.
        assert data == original


HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


@settings(max_examples=60, deadline=None, suppress_health_check=HEALTH)
@given(cut=st.integers(min_value=0))
def test_truncation(stream, tmp_path, cut):
    model, data = stream
    _must_fail_cleanly(model, data[: cut % len(data)], tmp_path, data)


@settings(max_examples=120, deadline=None, suppress_health_check=HEALTH)
@given(pos=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=7))
def test_bit_flip(stream, tmp_path, pos, bit):
    model, data = stream
    b = bytearray(data)
    b[pos % len(b)] ^= 1 << bit
    _must_fail_cleanly(model, bytes(b), tmp_path, data)


@settings(max_examples=60, deadline=None, suppress_health_check=HEALTH)
@given(pos=st.integers(min_value=0), junk=st.binary(min_size=1, max_size=16))
def test_inserted_bytes(stream, tmp_path, pos, junk):
    model, data = stream
    p = pos % (len(data) + 1)
    _must_fail_cleanly(model, data[:p] + junk + data[p:], tmp_path, data)


@settings(max_examples=60, deadline=None, suppress_health_check=HEALTH)
@given(pos=st.integers(min_value=0), n=st.integers(min_value=1, max_value=16))
def test_deleted_bytes(stream, tmp_path, pos, n):
    model, data = stream
    p = pos % len(data)
    _must_fail_cleanly(model, data[:p] + data[p + n :], tmp_path, data)


HEADER_FIELDS = {4: 255, 5: 2**32 - 1, 6: 2**32 - 1, 7: 2**32 - 1, 8: 2**32 - 1, 9: 2**32 - 1, 10: 2**16 - 1}


@settings(max_examples=150, deadline=None, suppress_health_check=HEALTH)
@given(changes=st.dictionaries(st.sampled_from(sorted(HEADER_FIELDS)), st.integers(0, 2**32 - 1), min_size=1))
def test_forged_header_with_valid_checksum(stream, tmp_path, changes):
    """A header re-packed with a valid CRC but made-up quality, size, frame rate, frame count or GOP is refused."""
    model, data = stream
    fields = list(bs.HEADER.unpack(data[: bs.HEADER.size]))
    for index, value in changes.items():
        fields[index] = value % (HEADER_FIELDS[index] + 1)
    body = bs.HEADER.pack(*fields)
    forged = body + bs.HEADER_CRC.pack(zlib.crc32(body)) + data[bs.HEADER_SIZE :]
    if forged == data:
        return
    with pytest.raises(FedlvcError):  # the chunk checksums are keyed by the header: any change is caught
        _decode(model, forged, tmp_path)


@settings(max_examples=40, deadline=None, suppress_health_check=HEALTH)
@given(junk=st.binary(min_size=0, max_size=512))
def test_arbitrary_bytes(stream, tmp_path, junk):
    model, data = stream
    _must_fail_cleanly(model, junk, tmp_path, data)
    _must_fail_cleanly(model, bs.MAGIC + junk, tmp_path, data)


@settings(max_examples=80, deadline=None, suppress_health_check=HEALTH)
@given(pos=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=7), start=st.integers(0, 4))
def test_bit_flip_with_random_access(stream, decoded, tmp_path, pos, bit, start):
    """Decoding from a later frame skips the chunks before its group's I-frame unread: damage there may go
    unnoticed, but what is output is then exactly the undamaged frames; any other outcome is FedlvcError."""
    model, data = stream
    start %= len(decoded)
    b = bytearray(data)
    b[pos % len(b)] ^= 1 << bit
    try:
        with allocates_at_most(64 << 20):
            frames = _decode(model, bytes(b), tmp_path, start)
    except FedlvcError:
        frames = None
    if frames is not None:
        assert len(frames) == len(decoded) - start
        for got, want in zip(frames, decoded[start:]):
            assert (got == want).all()
