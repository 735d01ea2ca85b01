"""Compressing and decompressing whole videos: frames ─► pad ─► g_a ─► round ─► ANS ─► .lvc, and back.

Both directions stream: the encoder holds one frame at a time, the decoder one chunk and one frame.
Outputs are written under a temporary name and renamed at the end, so a failure leaves no file.
"""

from __future__ import annotations

import os
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from . import bitstream as bs
from .checkpoint import fingerprint
from .entropy import LatentCoder
from .errors import FedlvcError
from .model import FedlvcCodec
from .video import VideoWriter, atomic_output, check_output_path, iter_frames, probe


def padded_size(height: int, width: int, stride: int) -> tuple[int, int]:
    return -(-height // stride) * stride, -(-width // stride) * stride


def _to_tensor(frame: np.ndarray, stride: int) -> torch.Tensor:
    """(H, W, 3) uint8 → (1, 3, H', W') in [0, 1], edge-padded to a multiple of ``stride``."""
    h, w = frame.shape[:2]
    ph, pw = padded_size(h, w, stride)
    if (ph, pw) != (h, w):
        frame = np.pad(frame, ((0, ph - h), (0, pw - w), (0, 0)), mode="edge")
    t = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float() / 255.0
    return t.contiguous(memory_format=torch.channels_last)


def _to_frame(x_hat: torch.Tensor, height: int, width: int) -> np.ndarray:
    x = x_hat[0, :, :height, :width].clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.permute(1, 2, 0).contiguous().numpy()


class FrameEncoder:
    """Encodes frames of one size at one quality level to chunk payloads."""

    def __init__(self, model: FedlvcCodec, quality: int, track_bits: bool = False):
        model.check_level(quality - 1)
        self.model, self.level = model.eval(), quality - 1
        self.coder = LatentCoder(model)
        self._levels = torch.tensor([self.level])
        self.track_bits = track_bits
        self.ideal_bits = 0.0  # −Σ log2 p of everything encoded so far (when track_bits)

    @torch.inference_mode()
    def latent(self, frame: np.ndarray) -> np.ndarray:
        y = self.model.analysis(_to_tensor(frame, self.model.cfg.stride), self._levels)
        return self.coder.clip(torch.round(y)[0].numpy().astype(np.int64))

    def encode(self, frame: np.ndarray) -> bytes:
        y_hat = self.latent(frame)
        if self.track_bits:
            self.ideal_bits += self.coder.bits(y_hat, self.level)
        return self.coder.encode(y_hat, self.level)


class FrameDecoder:
    def __init__(self, model: FedlvcCodec, quality: int, height: int, width: int):
        model.check_level(quality - 1)
        self.model, self.level = model.eval(), quality - 1
        self.height, self.width = height, width
        ph, pw = padded_size(height, width, model.cfg.stride)
        s = model.cfg.stride
        self.shape = (model.cfg.latent_channels, ph // s, pw // s)
        self.coder = LatentCoder(model)
        self._levels = torch.tensor([self.level])

    @property
    def max_payload(self) -> int:
        return bs.max_payload_bytes(int(np.prod(self.shape)))

    @torch.inference_mode()
    def decode(self, payload: bytes) -> np.ndarray:
        y_hat = self.coder.decode(payload, self.level, self.shape)
        y = torch.from_numpy(y_hat).float()[None].contiguous(memory_format=torch.channels_last)
        return _to_frame(self.model.synthesis(y, self._levels), self.height, self.width)


def encode_frames(frames: Iterable[np.ndarray], output: str | os.PathLike, model: FedlvcCodec, quality: int,
                  fps: Fraction, gop: int = 1, progress: tqdm | None = None) -> dict:
    """Write ``frames`` (RGB uint8, all one size) as a ``.lvc`` file at ``output`` (atomically)."""
    if gop != 1:
        raise FedlvcError("only intra coding (--gop 1) is implemented in bitstream version 1")
    encoder = FrameEncoder(model, quality, track_bits=True)
    fp = fingerprint(model)
    count, size, header = 0, None, None
    with atomic_output(output) as tmp, open(tmp, "wb") as f:
        f.write(bytes(bs.HEADER_SIZE))  # placeholder, rewritten once the frame count is known
        for frame in frames:
            if size is None:
                size = frame.shape[:2]
                header = bs.StreamHeader(fp, quality, size[1], size[0], Fraction(fps), 0, gop)
            elif frame.shape[:2] != size:
                raise FedlvcError(f"frame {count} has size {frame.shape[1]}x{frame.shape[0]}, "
                                  f"expected {size[1]}x{size[0]} (size changes are not supported)")
            bs.write_chunk(f, encoder.encode(frame), index=count, key=header.stream_key)
            count += 1
            if progress is not None:
                progress.update(1)
        if count == 0:
            raise FedlvcError("the input has no frames to compress")
        header = replace(header, frames=count)
        f.seek(0)
        f.write(header.pack())
        f.flush()
        total = f.seek(0, os.SEEK_END)
    pixels = count * size[0] * size[1]
    return {"frames": count, "width": size[1], "height": size[0], "quality": quality, "bytes": total,
            "bpp": total * 8 / pixels, "ideal_bpp": encoder.ideal_bits / pixels}


def _same_file(a, b) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve() or os.path.samefile(a, b)
    except OSError:
        return False


def compress_file(input_path, output_path, model: FedlvcCodec, quality: int = 4, gop: int = 1,
                  progress: bool = False) -> dict:
    """Compress any video PyAV reads into ``output_path`` (.lvc)."""
    out = Path(output_path)
    if out.suffix.lower() != ".lvc":
        raise FedlvcError(f"the compressed output must end in .lvc: {out}")
    check_output_path(out, (".lvc",))
    if _same_file(input_path, out):
        raise FedlvcError("the output would overwrite the input")
    model.check_level(quality - 1)
    info = probe(input_path)
    with tqdm(total=info.frames, desc="compress", unit="frame", disable=not progress) as bar:
        return encode_frames(iter_frames(input_path), out, model, quality, info.fps, gop, bar)


def open_stream(path) -> tuple[object, bs.StreamHeader, int]:
    p = Path(path)
    if not p.is_file():
        raise FedlvcError(f"input not found: {p}")
    size = p.stat().st_size
    if size == 0:
        raise FedlvcError(f"input is empty: {p}")
    f = open(p, "rb")
    try:
        header = bs.read_header(f, size)
    except BaseException:
        f.close()
        raise
    return f, header, size


def check_model(header: bs.StreamHeader, model: FedlvcCodec) -> None:
    fp = fingerprint(model)
    if header.fingerprint != fp:
        raise FedlvcError(f"the bitstream was made by a different model (fingerprint {header.fingerprint.hex()[:12]}, "
                          f"loaded model {fp.hex()[:12]}); pass the right --model")
    if not 1 <= header.quality <= model.cfg.num_levels:
        raise FedlvcError(f"bitstream quality {header.quality} is out of range 1..{model.cfg.num_levels}")


def decode_stream(path, model: FedlvcCodec) -> tuple[bs.StreamHeader, Iterator[np.ndarray]]:
    """Parse and check the header now; return it and a generator of decoded frames (one at a time)."""
    f, header, size = open_stream(path)
    try:
        check_model(header, model)
    except BaseException:
        f.close()
        raise
    decoder = FrameDecoder(model, header.quality, header.height, header.width)

    def frames():
        with f:
            pos = bs.HEADER_SIZE
            for i in range(header.frames):
                _, payload = bs.read_chunk(f, i, size - pos, decoder.max_payload, header.stream_key)
                pos += bs.CHUNK.size + len(payload)
                yield decoder.decode(payload)
            if pos != size:
                raise FedlvcError(f"bitstream has {size - pos} unexpected bytes after frame {header.frames - 1}")

    return header, frames()


def decompress_file(input_path, output_path, model: FedlvcCodec, progress: bool = False) -> dict:
    """Decode a ``.lvc`` file to ``.mkv`` (FFV1 RGB), ``.y4m`` or ``.mp4``; no output is left on error."""
    check_output_path(output_path)
    if _same_file(input_path, output_path):
        raise FedlvcError("the output would overwrite the input")
    header, frames = decode_stream(input_path, model)
    with VideoWriter(output_path, header.width, header.height, header.fps) as writer, \
            tqdm(total=header.frames, desc="decompress", unit="frame", disable=not progress) as bar:
        for frame in frames:
            writer.write(frame)
            bar.update(1)
    return {"frames": header.frames, "width": header.width, "height": header.height, "quality": header.quality}
