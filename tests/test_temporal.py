"""P-frame (temporal) coding: groups of pictures, the temporal prior's rate, random access, damage to
P-frame streams, compatibility with version-1 streams and intra-only models, the training rate of
``forward_segment`` against the coder, and the encoder's skip threshold."""

from __future__ import annotations

import dataclasses
import io
import math
import zlib
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIG, chunk_payloads, make_coding_model, restream, sha256

from client.cli import main
from common.checkpoint import load_model, save_model
from common.codec import DEFAULT_GOP, FrameDecoder, FrameEncoder, _to_frame, _to_tensor, decode_stream, encode_frames
from common.coding import bitstream as bs
from common.config.options import MAX_GOP, PFrameRule
from common.data.clips import generate_site_clip
from common.data.video import read_frames, write_video
from common.errors import FedlvcError
from common.net.architecture import ARCHITECTURE_INTRA
from common.net.model import FedlvcCodec
from common.net.temporal import MOTION_VALUES, NO_MOTION_HISTORY, TEMPORAL_CONTEXTS, next_history, temporal_context
from common.train.segments import forward_segment

W, H, N = 48, 40, 10  # padded to 48x48: a 3x3 latent of 8 channels
FPS = Fraction(25)
ANS_OVERHEAD_BITS = 64  # per payload: constriction's flushed state and word rounding (see test_entropy_bitstream)
ERROR_PREFIX = "fedlvc: error: "
PLAIN = PFrameRule()  # P-frames code round(y): the latent an I-frame would code


# ------------------------------------------------------------------------------------------------ helpers


def clip(n: int = N, width: int = W, height: int = H, site: int = 4, number: int = 0) -> list[np.ndarray]:
    """A static-camera classroom with moving people and sensor noise."""
    return list(generate_site_clip(site, number, width, height, n))


def chunk_table(data: bytes) -> list[bs.ChunkSpan]:
    """Where every chunk of a well-formed stream lies."""
    table = bs.chunk_table(data)
    assert table[-1].end == len(data)
    return table


def payloads(data: bytes) -> list[bytes]:
    """Every chunk's payload as the coder wrote it (whole 32-bit words)."""
    return [p + bytes(-len(p) % 4) for p in chunk_payloads(data)]


def header_of(data: bytes) -> bs.StreamHeader:
    return bs.read_header(io.BytesIO(data), len(data))


def decode_all(path, model, start=0, count=None) -> np.ndarray:
    _, frames = decode_stream(path, model, start, count)
    return np.stack(list(frames))


def decode_error(path, model, start=0, count=None) -> str:
    with pytest.raises(FedlvcError) as e:
        decode_all(path, model, start, count)
    return str(e.value)


def synthesize(model: FedlvcCodec, y_hat: np.ndarray, level: int) -> np.ndarray:
    """What a decoder must output for the latent ``y_hat``."""
    with torch.inference_mode():
        y = torch.from_numpy(y_hat).float()[None].contiguous(memory_format=torch.channels_last)
        return _to_frame(model.synthesis(y, torch.tensor([level])), H, W)


def cli(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def expect_user_error(capsys, args, folder: Path) -> str:
    """One ``fedlvc: error:`` line, exit code 2, nothing new (not even a temporary file) in ``folder``."""
    before = set(folder.iterdir())
    rc, out, err = cli(capsys, *args, "--quiet")
    assert rc == 2, (rc, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), err
    assert "Traceback" not in err and out == ""
    assert set(folder.iterdir()) == before
    return lines[0][len(ERROR_PREFIX) :]


# ------------------------------------------------------------------------------------------------ fixtures


def make_temporal_model(seed: int = 0, low: float = -2.0, high: float = 1.0) -> FedlvcCodec:
    """The tiny "coding" model (gains that make its latents vary) with a temporal prior whose scales differ
    per (level, channel, context), so that coding with a wrong context or level cannot go unnoticed."""
    m = make_coding_model(0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = m.temporal.table.weight
        w.copy_(low + (high - low) * torch.rand(w.shape, generator=g))
    return m.eval()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("temporal_model") / "temporal.safetensors"
    save_model(path, make_temporal_model())
    return path


@pytest.fixture(scope="module")
def model(model_path) -> FedlvcCodec:
    """:func:`make_temporal_model` as loaded from its checkpoint."""
    m = load_model(model_path)
    assert m.cfg.temporal
    return m


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    return clip()


@pytest.fixture(scope="module")
def streams(tmp_path_factory, model, frames) -> dict[int, Path]:
    """The clip coded at quality 4 with gop 1, 3, 4 and 7, plain rounding (read-only)."""
    folder = tmp_path_factory.mktemp("temporal")
    out = {}
    for gop in (1, 3, 4, 7):
        out[gop] = folder / f"gop{gop}.lvc"
        encode_frames(iter(frames), out[gop], model, 4, FPS, gop=gop, rule=PLAIN)
    return out


@pytest.fixture(scope="module")
def intra_model_path(tmp_path_factory) -> Path:
    """A version-1 (intra-only) model of the tiny size."""
    torch.manual_seed(0)
    m = FedlvcCodec(dataclasses.replace(TINY_CONFIG, architecture=ARCHITECTURE_INTRA)).eval()
    with torch.no_grad():
        m.gain.log_gain.weight.fill_(5.0)
        m.inv_gain.log_gain.weight.fill_(-5.0)
    path = tmp_path_factory.mktemp("intra") / "intra.safetensors"
    save_model(path, m)
    return path


# ------------------------------------------------------------------------------------------- 1. round trips


@pytest.mark.parametrize("skip", [0.0, 0.2])
@pytest.mark.parametrize("gop", [1, 4, 7])
def test_round_trip_in_groups(tmp_path, model, frames, gop, skip):
    """The stream's chunk types follow the group structure, the header records the gop, the summary counts
    I = ceil(n/gop) I-frames, and the decoder outputs exactly the frames the encoder's latents give, whether
    decode_stream reads the file or a fresh FrameDecoder is fed chunk by chunk."""
    path = tmp_path / "s.lvc"
    summary = encode_frames(iter(frames), path, model, 4, FPS, gop=gop, rule=PFrameRule(skip_threshold=skip))
    data = path.read_bytes()
    n_i = math.ceil(N / gop)
    assert summary["gop"] == gop and summary["frames"] == N
    assert summary["frames_by_type"] == {"I": n_i, "P": N - n_i}
    table = chunk_table(data)
    assert [c.frame_type for c in table] == [bs.frame_type_at(i, gop) for i in range(N)]
    assert [c.frame_type for c in table].count(bs.FRAME_INTRA) == n_i
    assert summary["chunk_bytes_by_type"]["I"] + summary["chunk_bytes_by_type"]["P"] == len(data) - bs.HEADER_SIZE
    assert summary["chunk_bytes_by_type"]["I"] == sum(c.end - c.offset for c in table if c.frame_type == bs.FRAME_INTRA)
    h = header_of(data)
    assert (h.gop, h.frames, h.version, h.width, h.height) == (gop, N, bs.VERSION, W, H)

    # What the encoder coded, frame by frame (an identically configured encoder is deterministic).
    encoder = FrameEncoder(model, 4, gop=gop, rule=PFrameRule(skip_threshold=skip))
    expected_latents, expected_frames = [], []
    for i, frame in enumerate(frames):
        ftype, payload = encoder.encode(frame, h.stream_key)
        assert ftype == bs.frame_type_at(i, gop)
        assert payload == payloads(data)[i]
        expected_latents.append(encoder.state.prev.copy())
        expected_frames.append(synthesize(model, encoder.state.prev, 3))
    assert len({y.tobytes() for y in expected_latents}) > 1  # the latents really change over the clip

    decoded = decode_all(path, model)
    np.testing.assert_array_equal(decoded, np.stack(expected_frames))

    decoder = FrameDecoder(model, h.quality, h.height, h.width, h.gop, h.version, h.stream_key)
    for i, payload in enumerate(payloads(data)):
        assert decoder.frame_type == bs.frame_type_at(i, gop)
        np.testing.assert_array_equal(decoder.decode(payload), decoded[i])
        np.testing.assert_array_equal(decoder.state.prev, expected_latents[i])


def test_gop_changes_the_rate_not_the_frames(model, frames, streams):
    """Without a skip threshold a P-frame codes the same latent an I-frame would: every gop decodes to the
    same frames, and the P-frames of a slowly changing static-camera clip cost less than I-frames."""
    reference = decode_all(streams[1], model)
    for gop in (3, 4, 7):
        np.testing.assert_array_equal(decode_all(streams[gop], model), reference)
    sizes = {gop: streams[gop].stat().st_size for gop in streams}
    assert sizes[7] < sizes[4] < sizes[3] < sizes[1], sizes


# ------------------------------------------------------------------------------------------- 2. P-frame bits


def test_identical_frames_cost_little_as_p_frames(tmp_path):
    """A clip of identical frames in one group: every P chunk is much smaller than the I chunk, and all frames
    decode the same."""
    n = 6
    still = [clip(1, 96, 80)[0]] * n
    path = tmp_path / "still.lvc"
    untrained = make_coding_model(0)  # the temporal table as initialised
    encode_frames(iter(still), path, untrained, 4, FPS, gop=n, rule=PLAIN)
    table = chunk_table(path.read_bytes())
    i_size, p_chunks = table[0].length, table[1:]
    assert table[0].frame_type == bs.FRAME_INTRA and all(c.frame_type == bs.FRAME_PREDICTED for c in p_chunks)
    # The untrained temporal prior has a scale of about 0.72 steps: an unchanged element costs about 1 bit.
    assert all(c.length * 4 <= i_size for c in p_chunks), (i_size, [c.length for c in p_chunks])
    decoded = decode_all(path, untrained)
    assert all(np.array_equal(f, decoded[0]) for f in decoded)


def test_confident_temporal_prior_codes_an_unchanged_frame_in_one_word(tmp_path, model):
    """With the temporal scales at their floor an unchanged latent costs (almost) nothing: a P payload is the
    32-bit end sentinel and no more, and its ideal cost is (almost) 0 bits."""
    confident = make_coding_model(0)
    with torch.no_grad():
        confident.temporal.table.weight.fill_(-30.0)
    still = [clip(1, 96, 80)[0]] * 5
    encoder = FrameEncoder(confident, 4, track_bits=True, gop=5)
    ftype, i_payload = encoder.encode(still[0])
    i_bits = encoder.ideal_bits
    assert ftype == bs.FRAME_INTRA and len(i_payload) >= 100
    for frame in still[1:]:
        ftype, payload = encoder.encode(frame)
        assert ftype == bs.FRAME_PREDICTED
        assert len(payload) <= 8, len(payload)
    assert encoder.ideal_bits - i_bits < 1.0
    path = tmp_path / "still.lvc"
    encode_frames(iter(still), path, confident, 4, FPS, gop=5, rule=PLAIN)
    decoded = decode_all(path, confident)
    assert all(np.array_equal(f, decoded[0]) for f in decoded)


def test_ideal_bpp_matches_the_file_size_of_a_p_heavy_stream(tmp_path, model):
    """One I-frame and 11 P-frames of moving content: the real size is the ideal code length plus the
    container and a bounded ANS overhead per chunk."""
    n = 12
    path = tmp_path / "p.lvc"
    summary = encode_frames(iter(clip(n, 96, 80)), path, model, 4, FPS, gop=n, rule=PLAIN)
    assert summary["frames_by_type"] == {"I": 1, "P": n - 1}
    pixels = n * 96 * 80
    ideal_bits = summary["ideal_bpp"] * pixels
    data = path.read_bytes()
    payload_bits = 8 * sum(len(p) for p in chunk_payloads(data))
    assert summary["bytes"] == len(data)
    assert summary["bytes"] * 8 == payload_bits + 8 * (bs.HEADER_SIZE + sum(c.head for c in chunk_table(data)))
    assert all(c.head <= 2 for c in chunk_table(data))  # a chunk head: 1 or 2 bytes at these sizes
    assert abs(payload_bits - ideal_bits) <= 0.01 * ideal_bits + n * ANS_OVERHEAD_BITS, (payload_bits, ideal_bits)
    # The P-frames carry real information (not just sentinels): the rate is not dominated by the I-frame.
    p_bits = 8 * summary["chunk_bytes_by_type"]["P"]
    assert p_bits > 8 * summary["chunk_bytes_by_type"]["I"]


def test_version_3_framing_costs_less_than_version_2(tmp_path, model, streams):
    """The same latents written as version 2 (9-byte chunk headers, whole words) and as version 3 (a varint
    head, the top word trimmed, the checksum inside the ANS stream in place of the sentinel): version 3
    saves at least 7 bytes a chunk, and its head is the shortest varint of the payload length."""
    data = streams[3].read_bytes()
    v2 = restream(data, model, version=2)
    assert header_of(v2).version == 2 and len(chunk_table(v2)) == N
    assert len(v2) - len(data) >= 7 * N, (len(v2), len(data))
    for c in chunk_table(data):
        assert c.head == (1 if 2 * c.length + 1 < 128 else 2)
        assert data[c.end - 1] != 0 or c.length % 4 == 1  # no zero high byte of the top word is stored
    np.testing.assert_array_equal(decode_all(streams[3], model), decode_all(_damaged(tmp_path, v2, "v2.lvc"), model))


def test_temporal_context_buckets():
    """Context = gradient bucket of prev (largest difference to its 4 neighbours, edges replicated) ×
    MOTION_VALUES + motion value: NO_MOTION_HISTORY for the first P-frame of a group; where the 3×3
    neighbourhood changed in the last frame, 1 + bucket of that change; where it did not, 5 + bucket of how
    many frames it has been still."""
    prev = torch.tensor([[0, 0, 0], [0, 5, 0], [0, 0, 0]], dtype=torch.int64)[None, None]
    ctx = temporal_context(prev, None)
    g = torch.tensor([[0, 3, 0], [3, 3, 3], [0, 3, 0]])  # |5 - 0| = 5 lies in [4, 8): bucket 3
    assert ctx.dtype == torch.int64
    assert torch.equal(ctx[0, 0], g * MOTION_VALUES + NO_MOTION_HISTORY)
    earlier = prev.clone()
    earlier[0, 0, 0, 0] = -2  # a change of 2 (bucket 1 of MOTION_BOUNDS) seen by the corner's 3x3 neighbourhood
    history = next_history(None, earlier, prev)
    moved = torch.tensor([[2, 2, 0], [2, 2, 0], [0, 0, 0]])
    still1 = 5  # still for one frame
    m = torch.where(moved > 0, moved, torch.full_like(moved, still1))
    assert torch.equal(temporal_context(prev, history)[0, 0], g * MOTION_VALUES + m)

    # Two and then four more still frames move the still elements to the next still buckets; a change resets.
    def still_value(frames_still):  # 1 | 2-3 | >= 4 frames
        return 5 if frames_still == 1 else (6 if frames_still < 4 else 7)

    for frames in (1, 2, 3, 10):
        h = history
        for _ in range(frames):
            h = next_history(h, prev, prev)
        # the corner's neighbourhood changed one frame later than the rest
        expected = torch.where(
            moved > 0, torch.full_like(moved, still_value(frames)), torch.full_like(moved, still_value(frames + 1))
        )
        assert torch.equal(temporal_context(prev, h)[0, 0], g * MOTION_VALUES + expected), frames
    moved_again = next_history(next_history(history, prev, prev), prev, earlier)  # the corner moves again
    m_again = torch.where(moved > 0, moved, torch.full_like(moved, still_value(3)))  # the rest: still 3 frames
    assert torch.equal(temporal_context(prev, moved_again)[0, 0], g * MOTION_VALUES + m_again)
    big = torch.randint(-255, 256, (2, 8, 5, 7))
    other = torch.randint(-255, 256, big.shape)
    for h in (None, next_history(None, other, big), next_history(next_history(None, big, big), big, big)):
        ctx = temporal_context(big, h)
        assert int(ctx.min()) >= 0 and int(ctx.max()) < TEMPORAL_CONTEXTS
    assert int(temporal_context(big, next_history(None, big.flip(0), big)).max()) >= TEMPORAL_CONTEXTS - MOTION_VALUES


# ------------------------------------------------------------------------------------------ 3. random access


@pytest.mark.parametrize("gop", [3, 4])
@pytest.mark.parametrize(
    "start,count", [(0, None), (0, 1), (1, 2), (3, 1), (4, 3), (5, 10), (6, None), (8, 2), (9, 1), (9, None), (2, 100)]
)
def test_random_access_gives_the_slice_of_the_full_decode(model, streams, gop, start, count):
    full = decode_all(streams[gop], model)
    header, gen = decode_stream(streams[gop], model, start, count)
    part = np.stack(list(gen))
    end = N if count is None else min(N, start + count)
    assert header.frames == end - start == len(part)
    np.testing.assert_array_equal(part, full[start:end])


def test_random_access_skips_the_groups_before_start_unread(tmp_path, model, streams):
    """Chunks before the I-frame that opens start's group are skipped (a damaged payload there does not
    matter); chunks of start's own group before start are decoded (their damage does)."""
    data = bytearray(streams[4].read_bytes())
    table = chunk_table(bytes(data))
    c = table[1]  # a P-frame of the first group
    data[c.payload_offset + c.length // 2] ^= 0x10
    bad = tmp_path / "bad.lvc"
    bad.write_bytes(bytes(data))
    full = decode_all(streams[4], model)
    np.testing.assert_array_equal(decode_all(bad, model, 4, 3), full[4:7])
    np.testing.assert_array_equal(decode_all(bad, model, 5), full[5:])
    assert "checksum" in decode_error(bad, model, 2, 1)  # frame 1 is a reference of frame 2
    assert "checksum" in decode_error(bad, model, 1, 1)


@pytest.mark.parametrize("start,count", [(N, None), (N + 5, 1), (-1, None), (0, 0), (3, -2)])
def test_random_access_out_of_range(model, streams, start, count):
    with pytest.raises(FedlvcError):
        decode_stream(streams[4], model, start, count)


def test_cli_decompress_start_and_frames(capsys, tmp_path, model, streams, model_path):
    full = decode_all(streams[4], model)
    for start, count, expected in [(5, 3, full[5:8]), (7, None, full[7:]), (9, 50, full[9:])]:
        out = tmp_path / f"s{start}.mkv"
        args = ["decompress", streams[4], out, "--model", model_path, "--start", start, "--quiet"]
        rc, stdout, err = cli(capsys, *args, *(["--frames", count] if count else []))
        assert rc == 0, err
        assert f"{len(expected)} frames {W}x{H}" in stdout
        np.testing.assert_array_equal(read_frames(out), expected)  # FFV1 RGB is lossless


@pytest.mark.parametrize("start", [N, 1000, -1])
def test_cli_decompress_bad_start(capsys, tmp_path, streams, model_path, start):
    before = sha256(streams[4])
    msg = expect_user_error(
        capsys, ["decompress", streams[4], tmp_path / "o.mkv", "--model", model_path, "--start", start], tmp_path
    )
    assert "--start" in msg
    assert sha256(streams[4]) == before


def test_cli_decompress_bad_frame_count(capsys, tmp_path, streams, model_path):
    with pytest.raises(SystemExit) as e:  # argparse refuses a non-positive count before anything runs
        main(
            [
                "decompress",
                str(streams[4]),
                str(tmp_path / "o.mkv"),
                "--model",
                str(model_path),
                "--frames",
                "0",
                "--quiet",
            ]
        )
    assert e.value.code == 2
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------- 4. damage


def _damaged(tmp_path, data: bytes | bytearray, name="bad.lvc") -> Path:
    path = tmp_path / name
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("index", [0, 1, 2, 3, 5, 9])
def test_flipped_frame_type_is_refused(tmp_path, model, streams, index):
    """I↔P: the type byte must match the frame's position in its group (gop 3: I P P I P P I P P I)."""
    data = bytearray(streams[3].read_bytes())
    c = chunk_table(bytes(data))[index]
    assert c.frame_type == bs.frame_type_at(index, 3)
    data[c.offset] ^= 1  # the low bit of the chunk head
    msg = decode_error(_damaged(tmp_path, data), model)
    assert "frame type" in msg and f"frame {index}" in msg


def test_unknown_frame_type_is_refused(tmp_path, model, streams):
    """Version 2 chunks have a type byte (version 3 heads have one type bit)."""
    data = bytearray(restream(streams[3].read_bytes(), model, version=2))
    data[chunk_table(bytes(data))[4].offset] = 7
    assert "frame type" in decode_error(_damaged(tmp_path, data), model)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_corrupted_p_payload_is_refused(tmp_path, model, streams, where):
    data = bytearray(streams[3].read_bytes())
    c = chunk_table(bytes(data))[4]
    assert c.frame_type == bs.FRAME_PREDICTED
    offset = {"first": 0, "middle": c.length // 2, "last": c.length - 1}[where]
    data[c.payload_offset + offset] ^= 0x01
    msg = decode_error(_damaged(tmp_path, data), model)
    assert "frame 4" in msg and "damaged" in msg


def test_swapped_p_chunks_are_refused(tmp_path, model, streams):
    """Two P chunks of one group exchanged (types still match): the index-keyed checksums catch it."""
    data = streams[3].read_bytes()
    table = chunk_table(data)
    a, b = table[1], table[2]
    swapped = data[: a.offset] + data[b.offset : b.end] + data[a.offset : a.end] + data[b.end :]
    assert len(swapped) == len(data) and swapped != data
    assert "checksum" in decode_error(_damaged(tmp_path, swapped), model)


@pytest.mark.parametrize("into", ["chunk_header", "payload_start", "payload_middle", "payload_end"])
def test_stream_truncated_inside_a_p_chunk(tmp_path, model, streams, into):
    data = streams[3].read_bytes()
    table = chunk_table(data)
    index = 7
    c = table[index]
    assert c.frame_type == bs.FRAME_PREDICTED
    cut = {
        "chunk_header": c.offset + c.head - 1,  # the last byte of the chunk head missing
        "payload_start": c.payload_offset,
        "payload_middle": c.payload_offset + c.length // 2,
        "payload_end": c.end - 1,
    }[into]
    bad = _damaged(tmp_path, data[:cut])
    msg = decode_error(bad, model)
    assert "truncated" in msg, msg
    # The frames before the damage were output before the error (streaming), and they were right.
    _, gen = decode_stream(bad, model)
    good = []
    with pytest.raises(FedlvcError):
        for frame in gen:
            good.append(frame)
    assert len(good) == index
    np.testing.assert_array_equal(np.stack(good), decode_all(streams[3], model)[:index])


def test_p_chunk_moved_to_an_i_position_is_refused(tmp_path, model, streams):
    """A valid P chunk (type byte, length, checksum) copied over the next group's I chunk."""
    data = streams[3].read_bytes()
    table = chunk_table(data)
    forged = data[: table[3].offset] + data[table[1].offset : table[1].end] + data[table[3].end :]
    assert "frame type" in decode_error(_damaged(tmp_path, forged), model)


# -------------------------------------------------------------------------------- 5. version compatibility


def test_version_1_stream_of_a_v2_model_decodes(tmp_path, model, streams):
    """A version-1 header (gop 1) over intra chunks whose checksums are keyed by that header decodes to the
    same frames; the header's version byte counts in the stream key."""
    data = streams[1].read_bytes()
    v1 = restream(data, model, version=1)
    assert v1[4] == 1 and header_of(v1).version == 1 and v1 != data
    path = _damaged(tmp_path, v1, "v1.lvc")
    np.testing.assert_array_equal(decode_all(path, model), decode_all(streams[1], model))
    np.testing.assert_array_equal(decode_all(path, model, 6, 2), decode_all(streams[1], model)[6:8])
    # Only the version byte of a version 2 stream changed (header CRC fixed, chunk CRCs not): every chunk
    # fails its checksum.
    data = restream(data, model, version=2)
    np.testing.assert_array_equal(decode_all(_damaged(tmp_path, data, "v2.lvc"), model), decode_all(streams[1], model))
    body = bytearray(data[: bs.HEADER.size])
    body[4] = 1
    patched = bytes(body) + bs.HEADER_CRC.pack(zlib.crc32(bytes(body))) + data[bs.HEADER_SIZE :]
    assert "checksum" in decode_error(_damaged(tmp_path, patched, "patched.lvc"), model)


@pytest.mark.parametrize("gop", [2, 3, 32])
def test_version_1_header_claiming_groups_is_refused(tmp_path, model, streams, gop):
    data = streams[3].read_bytes()
    v1 = restream(data, model, version=1, gop=gop)
    with pytest.raises(FedlvcError, match="version 1"):
        header_of(v1)
    msg = decode_error(_damaged(tmp_path, v1), model)
    assert "intra-only" in msg


def test_unknown_version_is_refused(tmp_path, model, streams):
    data = streams[3].read_bytes()
    for version in (0, bs.VERSION_HYPER + 1, 255):
        msg = decode_error(_damaged(tmp_path, restream(data, model, version=version)), model)
        assert f"version {version}" in msg


def test_intra_only_model_codes_gop_1_only(tmp_path, intra_model_path, frames):
    intra = load_model(intra_model_path)
    assert not intra.cfg.temporal and not hasattr(intra, "temporal")
    path = tmp_path / "intra.lvc"
    summary = encode_frames(iter(frames), path, intra, 3, FPS)
    assert summary["gop"] == 1 and summary["frames_by_type"] == {"I": N, "P": 0}
    data = path.read_bytes()
    decoded = decode_all(path, intra)
    assert decoded.shape == (N, H, W, 3)
    # Its streams also decode as version-1 streams.
    np.testing.assert_array_equal(
        decode_all(_damaged(tmp_path, restream(data, intra, version=1), "v1.lvc"), intra), decoded
    )
    for gop in (2, 4):
        with pytest.raises(FedlvcError, match="intra-only"):
            FrameEncoder(intra, 3, gop=gop)
        with pytest.raises(FedlvcError, match="intra-only"):
            encode_frames(iter(frames), tmp_path / "no.lvc", intra, 3, FPS, gop=gop)
        assert not (tmp_path / "no.lvc").exists()
        # A (well-formed) v2 stream with P-frames under the intra model's fingerprint cannot be decoded by it.
        forged = _damaged(tmp_path, restream(data, intra, gop=gop), "forged.lvc")
        assert "intra-only" in decode_error(forged, intra)
    with pytest.raises(FedlvcError, match="intra-only"):
        FrameDecoder(intra, 3, H, W, gop=3)


def test_cli_intra_only_model_defaults_to_gop_1(capsys, tmp_path, intra_model_path, frames):
    src = tmp_path / "clip.mkv"
    write_video(src, frames, FPS)
    out = tmp_path / "intra.lvc"
    rc, stdout, err = cli(capsys, "compress", src, out, "--model", intra_model_path, "--quiet")
    assert rc == 0, err
    assert "gop 1" in stdout and f"{N} I-frames, 0 P-frames" in stdout
    assert header_of(out.read_bytes()).gop == 1
    dec = tmp_path / "intra.mkv"
    assert cli(capsys, "decompress", out, dec, "--model", intra_model_path, "--start", 3, "--quiet")[0] == 0
    assert read_frames(dec).shape == (N - 3, H, W, 3)
    # Asking it for P-frames is a user error.
    msg = expect_user_error(
        capsys, ["compress", src, tmp_path / "p.lvc", "--model", intra_model_path, "--gop", 4], tmp_path
    )
    assert "intra-only" in msg


def test_cli_temporal_model_defaults_to_default_gop(capsys, tmp_path, model_path):
    frames = clip(DEFAULT_GOP + 2, 32, 32)
    src = tmp_path / "clip.mkv"
    write_video(src, frames, FPS)
    out = tmp_path / "t.lvc"
    rc, stdout, err = cli(capsys, "compress", src, out, "--model", model_path, "--quiet")
    assert rc == 0, err
    assert header_of(out.read_bytes()).gop == DEFAULT_GOP
    assert f"2 I-frames, {DEFAULT_GOP} P-frames" in stdout
    out1 = tmp_path / "t1.lvc"
    rc, stdout, err = cli(capsys, "compress", src, out1, "--model", model_path, "--gop", 1, "--quiet")
    assert rc == 0, err
    assert header_of(out1.read_bytes()).gop == 1 and f"{len(frames)} I-frames, 0 P-frames" in stdout
    for bad in ("--gop", MAX_GOP + 1), ("--skip-threshold", -0.5), ("--skip-threshold", 10):
        msg = expect_user_error(capsys, ["compress", src, tmp_path / "x.lvc", "--model", model_path, *bad], tmp_path)
        assert bad[0] in msg


# ------------------------------------------------------------------------ 6. training rate = coder's rate


@pytest.mark.parametrize(
    "seed,rule",
    [
        (0, PLAIN),
        (1, PLAIN),
        (0, PFrameRule(skip_threshold=0.3)),
        (0, PFrameRule(rd_weight=1.0)),
        (1, PFrameRule(rd_weight=0.3)),
    ],
)
def test_forward_segment_bits_equal_the_coders_ideal_bits(frames, seed, rule):
    """Eval-mode forward_segment's per-row bits are the ideal code length the coder spends on the same frames
    coded as one group (I-frame then P-frames), per row and level, with a temporal table that differs per
    (level, channel, context) so a wrong context or level shows."""
    model = make_temporal_model(seed, -1.0, 3.0)
    s, width, height = 5, 64, 48
    rows = [
        (clip(s, width, height, site=4), 3),
        (clip(s, width, height, site=1, number=1), 5),
        (clip(s, width, height, site=2), 0),
    ]
    x = torch.stack([torch.stack([_to_tensor(f, 16)[0] for f in fr]) for fr, _ in rows]).contiguous()
    levels = torch.tensor([level for _, level in rows])
    with torch.no_grad():
        out = forward_segment(model, x, levels, rule)
    assert out["bits"].shape == (len(rows),)
    assert out["x_hat"].shape == x.shape
    for b, (fr, level) in enumerate(rows):
        encoder = FrameEncoder(model, level + 1, track_bits=True, gop=s, rule=rule)
        types = [encoder.encode(f)[0] for f in fr]
        assert types == [bs.FRAME_INTRA] + [bs.FRAME_PREDICTED] * (s - 1)
        assert out["bits"][b].item() == pytest.approx(encoder.ideal_bits, rel=1e-3)
        # ... and differs from the all-intra rate of the same frames (the P-frames use the temporal prior).
        intra = FrameEncoder(model, level + 1, track_bits=True, gop=1)
        for f in fr:
            intra.encode(f)
        assert abs(intra.ideal_bits - encoder.ideal_bits) > 0.01 * encoder.ideal_bits
    # The decoded frames are the training path's eval reconstructions.
    encoder = FrameEncoder(model, 4, gop=s, rule=rule)
    for i, f in enumerate(rows[0][0]):
        encoder.encode(f)
        expected = out["x_hat"][0, i].clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        with torch.inference_mode():
            y = torch.from_numpy(encoder.state.prev).float()[None]
            got = _to_frame(model.synthesis(y, torch.tensor([3])), height, width)
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


# ---------------------------------------------------------------------------------------- 7. skip threshold


def test_skip_threshold_keeps_previous_latents(tmp_path, model, frames):
    t = 0.5
    encoder = FrameEncoder(model, 4, gop=N, rule=PFrameRule(skip_threshold=t))
    plain = FrameEncoder(model, 4, gop=N)
    kept_total = 0
    for i, frame in enumerate(frames):
        prev = None if encoder.state.prev is None else encoder.state.prev.copy()
        y = encoder.analysis(frame)
        encoder.encode(frame)
        plain.encode(frame)
        y_hat = encoder.state.prev
        rounded = np.clip(np.round(y).astype(np.int64), -model.cfg.support, model.cfg.support)
        if i == 0:  # the I-frame is never affected
            np.testing.assert_array_equal(y_hat, rounded)
            np.testing.assert_array_equal(y_hat, plain.state.prev)
            continue
        near = np.abs(y - prev) < 0.5 + t
        np.testing.assert_array_equal(y_hat[near], prev[near])
        np.testing.assert_array_equal(y_hat[~near], rounded[~near])
        kept_total += int((near & (prev != rounded)).sum())
    assert kept_total > 0  # the threshold made a difference somewhere

    sizes, decoded = {}, {}
    for th in (0.0, t):
        path = tmp_path / f"t{th}.lvc"
        summary = encode_frames(iter(frames), path, model, 4, FPS, gop=N, rule=PFrameRule(skip_threshold=th))
        sizes[th] = summary["bytes"]
        decoded[th] = decode_all(path, model)
    assert sizes[t] <= sizes[0.0], sizes
    assert not np.array_equal(decoded[t], decoded[0.0])
    np.testing.assert_array_equal(decoded[t][0], decoded[0.0][0])
    # The decoder needs no knowledge of T: it reproduces the encoder's latents.
    encoder = FrameEncoder(model, 4, gop=N, rule=PFrameRule(skip_threshold=t))
    decoder = FrameDecoder(model, 4, H, W, N)
    for frame in frames:
        _, payload = encoder.encode(frame)
        np.testing.assert_array_equal(decoder.decode_latent(payload), encoder.state.prev)


def test_skip_threshold_has_no_effect_on_intra_streams(tmp_path, model, frames):
    a, b = tmp_path / "a.lvc", tmp_path / "b.lvc"
    encode_frames(iter(frames), a, model, 4, FPS, gop=1, rule=PLAIN)
    encode_frames(iter(frames), b, model, 4, FPS, gop=1, rule=PFrameRule(skip_threshold=2.0))
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("bad", [-0.1, 10.0, float("nan")])
def test_skip_threshold_out_of_range(model, bad):
    with pytest.raises(FedlvcError, match="skip-threshold"):
        FrameEncoder(model, 4, gop=4, rule=PFrameRule(skip_threshold=bad))
