"""The ``.lvc`` container: a versioned, checksummed header and one length-prefixed chunk per frame.

Layout (all integers big-endian)::

    header  (49 bytes)
      magic        4s   b"FLVC"
      version      B    2 (version 1 streams, intra-only, are still read)
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
      type         B    0 = intra (I) frame, 1 = predicted (P) frame; must match the position in the group
      length       I    payload bytes (a multiple of 4: ANS words)
      crc          I    CRC-32 of the frame index (I) and the payload, seeded with the stream key: the CRC-32
                        of the header with its frame count set to 0, so a chunk only checks out at its own
                        position in a stream with the header it was written under
      payload      length bytes
    end of file (trailing bytes are an error)

Every size is checked against hard limits and against the file's own length before anything is allocated.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from fractions import Fraction
from typing import BinaryIO

from .errors import FedlvcError

MAGIC = b"FLVC"
VERSION = 2
READABLE_VERSIONS = (1, 2)
HEADER = struct.Struct(">4sBB16sBIIIIIH")
HEADER_CRC = struct.Struct(">I")
HEADER_SIZE = HEADER.size + HEADER_CRC.size
CHUNK = struct.Struct(">BII")
FRAME_INTRA = 0
FRAME_PREDICTED = 1
FRAME_TYPE_NAMES = {FRAME_INTRA: "I", FRAME_PREDICTED: "P"}

MAX_SIDE = 16384  # pixels
MAX_PIXELS = 8192 * 8192
MAX_FRAMES = 10_000_000
MAX_GOP = 65535  # the header field is 16 bits
DEFAULT_GOP = 32  # an I-frame (random-access point) every 32 frames
DEFAULT_RD_WEIGHT = 1.0  # encoder choice: rate-distortion optimised P-frames (common.model.PFrameRule)
DEFAULT_SKIP_THRESHOLD = 0.2  # the skip rule's threshold where it is asked for (rd weight 0)


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
        return HEADER.pack(MAGIC, self.version, 0, self.fingerprint, self.quality, self.width, self.height,
                           fps.numerator, fps.denominator, frames, self.gop)

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
        raise FedlvcError(f"bitstream version {version} is not supported (this fedlvc reads versions "
                          f"{', '.join(map(str, READABLE_VERSIONS))}; a newer fedlvc wrote it?)")
    (crc,) = HEADER_CRC.unpack(raw[HEADER.size :])
    if crc != zlib.crc32(raw[: HEADER.size]):
        raise FedlvcError("bitstream header is damaged (checksum mismatch)")
    if flags != 0:
        raise FedlvcError(f"bitstream uses unknown flags {flags:#x}")
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE and width * height <= MAX_PIXELS):
        raise FedlvcError(f"bitstream claims an unsupported frame size {width}x{height}")
    if fps_num == 0 or fps_den == 0:
        raise FedlvcError("bitstream claims a zero frame rate")
    if frames > MAX_FRAMES or frames * (CHUNK.size + 4) > file_size - HEADER_SIZE:
        raise FedlvcError(f"bitstream claims {frames} frames, more than its {file_size} bytes can hold (truncated?)")
    if gop == 0:
        raise FedlvcError("bitstream claims a group-of-pictures length of 0")
    if version == 1 and gop != 1:  # version 1 codes every frame as an intra frame
        raise FedlvcError(f"bitstream claims a group-of-pictures length of {gop}; version 1 streams are intra-only")
    return StreamHeader(fp, quality, width, height, Fraction(fps_num, fps_den), frames, gop, version)


def chunk_crc(payload: bytes, index: int, key: int) -> int:
    return zlib.crc32(payload, zlib.crc32(struct.pack(">I", index), key))


def write_chunk(f: BinaryIO, payload: bytes, frame_type: int = FRAME_INTRA, *, index: int = 0, key: int = 0) -> int:
    f.write(CHUNK.pack(frame_type, len(payload), chunk_crc(payload, index, key)))
    f.write(payload)
    return CHUNK.size + len(payload)


def frame_type_at(index: int, gop: int) -> int:
    return FRAME_INTRA if index % gop == 0 else FRAME_PREDICTED


def _chunk_header(f: BinaryIO, index: int, remaining: int, max_payload: int, expected_type: int) -> tuple[int, int]:
    raw = f.read(CHUNK.size)
    if len(raw) < CHUNK.size:
        raise FedlvcError(f"bitstream is truncated at frame {index}")
    frame_type, length, crc = CHUNK.unpack(raw)
    if frame_type not in FRAME_TYPE_NAMES:
        raise FedlvcError(f"frame {index} has unknown frame type {frame_type}")
    if frame_type != expected_type:
        raise FedlvcError(f"frame {index} has frame type {FRAME_TYPE_NAMES[frame_type]} where the group "
                          f"structure puts type {FRAME_TYPE_NAMES[expected_type]} (damaged stream)")
    if length > max_payload or length % 4:
        raise FedlvcError(f"frame {index} claims an impossible payload size of {length} bytes")
    if length > remaining - CHUNK.size:
        raise FedlvcError(f"bitstream is truncated at frame {index}")
    return length, crc


def skip_chunk(f: BinaryIO, index: int, remaining: int, max_payload: int, expected_type: int) -> int:
    """Skip frame chunk ``index`` without reading its payload (random access); returns its size in bytes."""
    length, _ = _chunk_header(f, index, remaining, max_payload, expected_type)
    f.seek(length, 1)
    return CHUNK.size + length


def read_chunk(f: BinaryIO, index: int, remaining: int, max_payload: int, key: int = 0,
               expected_type: int = FRAME_INTRA) -> tuple[int, bytes]:
    """Read frame chunk ``index``; ``remaining`` is the number of bytes left in the file, ``key`` the stream
    key of its header, ``expected_type`` the frame type its position in the group requires."""
    length, crc = _chunk_header(f, index, remaining, max_payload, expected_type)
    frame_type = expected_type
    payload = f.read(length)
    if len(payload) != length:
        raise FedlvcError(f"bitstream is truncated at frame {index}")
    if chunk_crc(payload, index, key) != crc:
        raise FedlvcError(f"frame {index} is damaged (checksum mismatch)")
    return frame_type, payload
