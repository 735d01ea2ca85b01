"""The ``.lvc`` container: a versioned, checksummed header and one chunk per frame.

Layout (integers in the header big-endian)::

    header  (49 bytes)
      magic        4s   b"FLVC"
      version      B    5 for models with motion-compensated P-frames (common.motion.residual), 4 for models of
                   architecture v4 (I-frames under the hyperprior, common.coding.hypercoder), 3 for the older ones;
                   versions 1 and 2 are still read (see "older versions" below). Versions 3, 4 and 5 share this
                   layout; a version 5 stream needs a motion model, a version 4 one a v4 model and a version 3
                   one an older model (the fingerprint names the model anyway)
      flags        B    0 (reserved)
      fingerprint  16s  hash of the model that wrote the stream (see common.checkpoint.fingerprint)
      quality      B    1..N
      width        I    frame width in pixels (before padding to the model stride)
      height       I
      fps_num      I    frame rate as a fraction
      fps_den      I
      frames       I    number of frame chunks that follow
      gop          H    group-of-pictures length G >= 1: frame i is an I-frame when i % G == 0, else a P-frame
                        coded against the frames before it in its group (1: every frame is an I-frame;
                        version 1 streams always have 1). Decoding can start at any I-frame.
      header_crc   I    CRC-32 of the 45 bytes before it
    chunk × frames
      head         LEB128 varint (1-5 bytes, shortest form): payload length × 2 + frame type (0 = intra (I)
                   frame, 1 = predicted (P) frame; must match the position in the group); version 5: payload
                   length × 4 + frame type, type 2 being a motion-compensated P-frame (M), which a P position
                   holds as well as a P-frame
      payload      length bytes: the frame's ANS words (32-bit, little-endian), the last one (the top of
                   the coder's state) without its zero high bytes
    end of file (trailing bytes are an error)

A version 5 M-frame's ANS stream holds its block vectors (their differences to the median predictor, decoded
first) and then its residual latent; its check value covers both (:func:`motion_checksum`).

Each chunk's checksum travels inside its ANS stream: the last 32 bits its decoder reads are the CRC-32 of
the frame index and the decoded latent (:func:`latent_checksum`), seeded with the stream key (the CRC-32
of the header with its frame count set to 0). So a chunk only checks out at its own position in a stream
with the header it was written under, and damage anywhere in it (or a header forged to claim another
frame size) is caught once the frame is entropy-decoded, before anything is reconstructed. A frame then
costs its latent's entropy-coded bits plus 6-8 bytes (head, checksum, the rest of the coder's final
state): tiny P-frames of a still camera are not dominated by framing (versions 1 and 2 spent about 15).

Older versions (read, never written): a chunk is ``type B, length I, crc I`` (9 bytes, big-endian),
``crc`` being the CRC-32 of the frame index and the payload seeded with the stream key, then a payload of
whole 32-bit words whose ANS stream ends with a fixed 32-bit sentinel instead of the latent checksum.

Every size is checked against hard limits and against the file's own length before anything is allocated.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from fractions import Fraction
from typing import BinaryIO

import numpy as np

from common.errors import FedlvcError

MAGIC = b"FLVC"
VERSION = 3  # what models of architectures v1-v3 write
VERSION_HYPER = 4  # what architecture v4 writes
VERSION_MOTION = 5  # what a model with motion-compensated P-frames writes (either architecture)
READABLE_VERSIONS = (1, 2, 3, 4, 5)


def version_for(cfg) -> int:
    """The version a model of config ``cfg`` (common.net.architecture.CodecConfig) writes: 5 with motion-compensated
    P-frames, else 4 with a hyperprior (architecture v4), else 3."""
    return VERSION_MOTION if cfg.motion else VERSION_HYPER if cfg.hyper else VERSION


def readable_by(cfg) -> tuple[int, ...]:
    """The versions a model of config ``cfg`` decodes: its own, and for a v3 model the older 1 and 2."""
    own = version_for(cfg)
    return (1, 2, VERSION) if own == VERSION else (own,)


HEADER = struct.Struct(">4sBB16sBIIIIIH")
HEADER_CRC = struct.Struct(">I")
HEADER_SIZE = HEADER.size + HEADER_CRC.size
CHUNK = struct.Struct(">BII")  # the chunk header of versions 1 and 2
MAX_HEAD_BYTES = 5  # a version 3 chunk head: 35 bits hold any payload length allowed below
FRAME_INTRA = 0
FRAME_PREDICTED = 1
FRAME_MOTION = 2  # version 5: a motion-compensated P-frame (a P position's other kind)
FRAME_TYPE_NAMES = {FRAME_INTRA: "I", FRAME_PREDICTED: "P", FRAME_MOTION: "M"}


def type_bits(version: int) -> int:
    """Bits of a chunk head that hold the frame type: 2 in version 5 (I, P, M), else 1 (I, P)."""
    return 2 if version >= VERSION_MOTION else 1


MAX_SIDE = 16384  # pixels
MAX_PIXELS = 8192 * 8192
MAX_FRAMES = 10_000_000


@dataclass(frozen=True)
class StreamHeader:
    fingerprint: bytes
    quality: int  # 1..N as the user sees it
    width: int
    height: int
    fps: Fraction
    frames: int
    gop: int = 1
    version: int = VERSION

    def _body(self, frames: int) -> bytes:
        fps = Fraction(self.fps).limit_denominator(1_000_000)
        return HEADER.pack(
            MAGIC,
            self.version,
            0,
            self.fingerprint,
            self.quality,
            self.width,
            self.height,
            fps.numerator,
            fps.denominator,
            frames,
            self.gop,
        )

    def pack(self) -> bytes:
        body = self._body(self.frames)
        return body + HEADER_CRC.pack(zlib.crc32(body))

    @property
    def stream_key(self) -> int:
        """Seed of every chunk checksum: binds chunks to this header (known before the frame count is)."""
        return zlib.crc32(self._body(0))


def max_payload_bytes(latent_elements: int) -> int:
    """Upper bound on one frame's ANS payload: constriction spends < 32 bits on any symbol here."""
    return 4 * latent_elements + 64


def read_header(f: BinaryIO, file_size: int) -> StreamHeader:
    raw = f.read(HEADER_SIZE)
    if len(raw) < 4 or raw[:4] != MAGIC:
        raise FedlvcError("not a fedlvc bitstream (bad magic bytes)")
    if len(raw) < HEADER_SIZE:
        raise FedlvcError("bitstream is truncated inside its header")
    magic, version, flags, fp, quality, width, height, fps_num, fps_den, frames, gop = HEADER.unpack(raw[: HEADER.size])
    if version not in READABLE_VERSIONS:
        raise FedlvcError(
            f"bitstream version {version} is not supported (this fedlvc reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}; a newer fedlvc wrote it?)"
        )
    (crc,) = HEADER_CRC.unpack(raw[HEADER.size :])
    if crc != zlib.crc32(raw[: HEADER.size]):
        raise FedlvcError("bitstream header is damaged (checksum mismatch)")
    if flags != 0:
        raise FedlvcError(f"bitstream uses unknown flags {flags:#x}")
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE and width * height <= MAX_PIXELS):
        raise FedlvcError(f"bitstream claims an unsupported frame size {width}x{height}")
    if fps_num == 0 or fps_den == 0:
        raise FedlvcError("bitstream claims a zero frame rate")
    if frames > MAX_FRAMES or frames * min_chunk_bytes(version) > file_size - HEADER_SIZE:
        raise FedlvcError(f"bitstream claims {frames} frames, more than its {file_size} bytes can hold (truncated?)")
    if gop == 0:
        raise FedlvcError("bitstream claims a group-of-pictures length of 0")
    if version == 1 and gop != 1:  # version 1 codes every frame as an intra frame
        raise FedlvcError(f"bitstream claims a group-of-pictures length of {gop}; version 1 streams are intra-only")
    return StreamHeader(fp, quality, width, height, Fraction(fps_num, fps_den), frames, gop, version)


def min_chunk_bytes(version: int) -> int:
    return 1 if version >= 3 else CHUNK.size + 4


def latent_checksum(y_hat, index: int, key: int) -> int:
    """CRC-32 of frame ``index`` and its integer latent (as little-endian int16), seeded with the stream key:
    what a version 3 chunk's ANS stream ends with."""
    data = np.ascontiguousarray(y_hat, dtype="<i2").tobytes()
    return zlib.crc32(data, zlib.crc32(struct.pack(">I", index), key))


def motion_checksum(y_hat, vectors, index: int, key: int) -> int:
    """What a version 5 P-frame's ANS stream ends with: :func:`latent_checksum` of its residual latent and its
    block-vector differences (int16 both) together."""
    both = np.concatenate([np.asarray(y_hat).reshape(-1), np.asarray(vectors).reshape(-1)])
    return latent_checksum(both, index, key)


def chunk_crc(payload: bytes, index: int, key: int) -> int:
    """The payload checksum of a version 1 or 2 chunk."""
    return zlib.crc32(payload, zlib.crc32(struct.pack(">I", index), key))


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _stored_length(words: bytes) -> int:
    """Bytes of a version 3 payload: the ANS words without the top word's zero high bytes."""
    if len(words) % 4:
        raise ValueError("an ANS payload is a whole number of 32-bit words")
    n = len(words)
    while n > len(words) - 3 and n > 0 and words[n - 1] == 0:
        n -= 1
    return n


def chunk_size(words: bytes, frame_type: int, version: int = VERSION) -> int:
    """Bytes on disk of the version 3-5 chunk of an ANS payload (what :func:`write_chunk` writes)."""
    return len(pack_chunk(words, frame_type, version))


def pack_chunk(words: bytes, frame_type: int, version: int = VERSION) -> bytes:
    """A version 3-5 chunk (head and payload) of an ANS payload of whole 32-bit little-endian words."""
    n = _stored_length(words)
    return _varint((n << type_bits(version)) + frame_type) + words[:n]


def write_chunk(f: BinaryIO, words: bytes, frame_type: int = FRAME_INTRA, version: int = VERSION) -> int:
    """Write one version 3-5 chunk; returns its size in bytes."""
    chunk = pack_chunk(words, frame_type, version)
    f.write(chunk)
    return len(chunk)


def frame_type_at(index: int, gop: int) -> int:
    return FRAME_INTRA if index % gop == 0 else FRAME_PREDICTED


def _read_head(f: BinaryIO, index: int, version: int) -> tuple[int, int, int | None, int]:
    """(frame type, payload length, crc or None, head size) of the chunk header at the file position."""
    if version < 3:
        raw = f.read(CHUNK.size)
        if len(raw) < CHUNK.size:
            raise FedlvcError(f"bitstream is truncated at frame {index}")
        frame_type, length, crc = CHUNK.unpack(raw)
        return frame_type, length, crc, CHUNK.size
    value = 0
    for i in range(MAX_HEAD_BYTES):
        raw = f.read(1)
        if not raw:
            raise FedlvcError(f"bitstream is truncated at frame {index}")
        value |= (raw[0] & 0x7F) << (7 * i)
        if not raw[0] & 0x80:
            if raw[0] == 0 and i > 0:
                raise FedlvcError(f"frame {index} has a malformed chunk head (damaged stream)")
            bits = type_bits(version)
            return value & ((1 << bits) - 1), value >> bits, None, i + 1
    raise FedlvcError(f"frame {index} has a malformed chunk head (damaged stream)")


def _chunk_header(
    f: BinaryIO, index: int, remaining: int, max_payload: int, expected_type: int, version: int
) -> tuple[int, int | None, int, int]:
    frame_type, length, crc, head = _read_head(f, index, version)
    if frame_type not in FRAME_TYPE_NAMES or (frame_type == FRAME_MOTION and version < VERSION_MOTION):
        raise FedlvcError(f"frame {index} has unknown frame type {frame_type}")
    if frame_type != expected_type and not (frame_type == FRAME_MOTION and expected_type == FRAME_PREDICTED):
        raise FedlvcError(
            f"frame {index} has frame type {FRAME_TYPE_NAMES[frame_type]} where the group "
            f"structure puts type {FRAME_TYPE_NAMES[expected_type]} (damaged stream)"
        )
    if length > max_payload or (version < 3 and length % 4):
        raise FedlvcError(f"frame {index} claims an impossible payload size of {length} bytes")
    if length > remaining - head:
        raise FedlvcError(f"bitstream is truncated at frame {index}")
    return length, crc, head, frame_type


def skip_chunk(
    f: BinaryIO, index: int, remaining: int, max_payload: int, expected_type: int, version: int = VERSION
) -> int:
    """Skip frame chunk ``index`` without reading its payload (random access); returns its size in bytes."""
    length, _, head, _ = _chunk_header(f, index, remaining, max_payload, expected_type, version)
    f.seek(length, 1)
    return head + length


def read_frame_chunk(
    f: BinaryIO,
    index: int,
    remaining: int,
    max_payload: int,
    key: int = 0,
    expected_type: int = FRAME_INTRA,
    version: int = VERSION,
) -> tuple[bytes, int, int]:
    """Read frame chunk ``index`` of a stream of ``version``; ``remaining`` is the number of bytes left in
    the file, ``key`` the stream key of its header, ``expected_type`` the frame type its position in the
    group requires. Returns (ANS payload as whole 32-bit words, chunk size in bytes, frame type). The payload checksum
    of versions 1 and 2 is checked here; version 3's latent checksum when the payload is decoded."""
    length, crc, head, frame_type = _chunk_header(f, index, remaining, max_payload, expected_type, version)
    payload = f.read(length)
    if len(payload) != length:
        raise FedlvcError(f"bitstream is truncated at frame {index}")
    if crc is not None and chunk_crc(payload, index, key) != crc:
        raise FedlvcError(f"frame {index} is damaged (checksum mismatch)")
    return payload + bytes(-length % 4), head + length, frame_type


def read_chunk(f: BinaryIO, index: int, remaining: int, max_payload: int, key: int = 0,
               expected_type: int = FRAME_INTRA, version: int = VERSION) -> tuple[bytes, int]:  # fmt: skip
    """:func:`read_frame_chunk` without the frame type: (payload, chunk size in bytes)."""
    return read_frame_chunk(f, index, remaining, max_payload, key, expected_type, version)[:2]


@dataclass(frozen=True)
class ChunkSpan:
    offset: int  # of the chunk in the file
    head: int  # bytes of its head (version 3) or header (versions 1, 2)
    length: int  # payload bytes
    frame_type: int

    @property
    def payload_offset(self) -> int:
        return self.offset + self.head

    @property
    def end(self) -> int:
        return self.offset + self.head + self.length


def chunk_table(data: bytes) -> list[ChunkSpan]:
    """Where each frame chunk of a whole ``.lvc`` file lies (for inspection and tests; checks only the
    header and the chunk heads, not the payloads)."""
    f = io.BytesIO(data)
    header = read_header(f, len(data))
    spans, pos = [], HEADER_SIZE
    for i in range(header.frames):
        frame_type, length, _, head = _read_head(f, i, header.version)
        spans.append(ChunkSpan(pos, head, length, frame_type))
        pos += head + length
        f.seek(pos)
    return spans
