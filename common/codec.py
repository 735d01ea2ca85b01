"""Compressing and decompressing whole videos: frames ─► pad ─► g_a ─► round ─► ANS ─► .lvc, and back.

Frames come in groups of pictures of length ``gop``: the first of each group is an I-frame (its latent
coded under the factorized prior), the others P-frames (their latent coded under the temporal prior,
around the previous decoded latent; or, for a motion model, block vectors and a motion-compensated residual,
:mod:`common.motion.residual`). Decoding can start at any I-frame.

Both directions stream: the encoder holds one frame, the previous latent and the group's motion history
(two arrays of the latent's size), the decoder one chunk, one frame and the same (a motion model: the
previous decoded frame, the group's residual history and its vector counts).
Outputs are written under a temporary name and renamed at the end, so a failure leaves no file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.coding import bitstream as bs
from common.coding.entropy import LatentCoders, pack
from common.coding.latent import Condition, LatentCodec
from common.coding.rdo import synthesis_sensitivity
from common.config.options import GOP, RD_WEIGHT, SKIP_THRESHOLD, PFrameRule
from common.data.video import VideoWriter, atomic_output, check_output_path, iter_frames, probe
from common.motion.residual import MotionPFrames, to_uint8
from common.net.model import FedlvcCodec
from common.net.temporal import next_history

from .checkpoint import fingerprint
from .errors import FedlvcError

# The encoder's defaults (their limits: common.config.options): an I-frame every DEFAULT_GOP frames, P-frame latents
# chosen by rate-distortion cost.
DEFAULT_GOP = GOP.default
DEFAULT_P_RULE = PFrameRule(rd_weight=RD_WEIGHT.default)  # fedlvc compress's P-frame quantization


def padded_size(height: int, width: int, stride: int) -> tuple[int, int]:
    return -(-height // stride) * stride, -(-width // stride) * stride


def _padded(frame: np.ndarray, stride: int) -> np.ndarray:
    """(H, W, 3) uint8 edge-padded to (H', W', 3), multiples of ``stride``."""
    h, w = frame.shape[:2]
    ph, pw = padded_size(h, w, stride)
    if (ph, pw) != (h, w):
        frame = np.pad(frame, ((0, ph - h), (0, pw - w), (0, 0)), mode="edge")
    return np.ascontiguousarray(frame)


def _to_tensor(frame: np.ndarray, stride: int) -> torch.Tensor:
    """(H, W, 3) uint8 → (1, 3, H', W') in [0, 1], edge-padded to a multiple of ``stride``."""
    t = torch.from_numpy(_padded(frame, stride)).permute(2, 0, 1)[None].float() / 255.0
    return t.contiguous(memory_format=torch.channels_last)


def _to_frame(x_hat: torch.Tensor, height: int, width: int) -> np.ndarray:
    x = x_hat[0, :, :height, :width].clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.permute(1, 2, 0).contiguous().numpy()


def check_gop(model: FedlvcCodec, gop: int) -> None:
    GOP.check(gop, "option")
    if gop > 1 and not model.cfg.temporal:
        raise FedlvcError("this model is intra-only (no temporal prior): use --gop 1")


def check_encoding(model: FedlvcCodec, quality: int, gop: int, rule: PFrameRule) -> None:
    """Refuse what an encoder cannot do: the one check of an encoding's settings, made by :class:`FrameEncoder`
    (which every way of encoding builds before it reads a frame or opens an output)."""
    check_gop(model, gop)
    RD_WEIGHT.check(rule.rd_weight, "option")
    SKIP_THRESHOLD.check(rule.skip_threshold, "option")
    model.check_level(quality - 1)


class _GroupState:
    """The previous decoded latent of the current group of pictures and the group's motion history (all a
    P-frame depends on)."""

    def __init__(self, gop: int):
        self.gop, self.index = gop, 0
        self.prev, self.history = None, None

    @property
    def frame_type(self) -> int:
        return bs.frame_type_at(self.index, self.gop)

    def condition(self, level: int) -> Condition:
        """What the next frame's latent is coded under: the level and, for a P-frame, the group's previous latent
        and motion history."""
        return Condition(level) if self.frame_type == bs.FRAME_INTRA else Condition(level, self.prev, self.history)

    def advance(self, y_hat: np.ndarray | None) -> None:
        """On to the next frame; ``y_hat``: the decoded latent (None: a motion model, whose P-frames need none
        of this state)."""
        if y_hat is None:
            self.index += 1
            return
        if self.frame_type == bs.FRAME_INTRA:
            self.history = None
        else:
            self.history = next_history(self.history, torch.from_numpy(self.prev)[None], torch.from_numpy(y_hat)[None])
        self.prev = y_hat
        self.index += 1


@dataclass(frozen=True)
class Decision:
    """What an encoder decided for a frame's latent: the coder that codes it, the latent and its parameters."""

    codec: LatentCodec
    latent: np.ndarray
    params: object


class FrameEncoder:
    """Encodes frames of one size at one quality level to (frame type, chunk payload), in groups of
    ``gop`` frames. ``rule`` says how a P-frame's integer latent is chosen (:class:`common.config.options.PFrameRule`:
    rate–distortion optimised, or rounding with a skip threshold); the decoder does not need to know it."""

    def __init__(
        self, model: FedlvcCodec, quality: int, track_bits: bool = False, gop: int = 1, rule: PFrameRule = PFrameRule()
    ):
        check_encoding(model, quality, gop, rule)
        self.model, self.level = model.eval(), quality - 1
        self.state = _GroupState(gop)
        self.coders = LatentCoders(model)
        self._levels = torch.tensor([self.level])
        self.rule = rule
        self._weights = None  # the group's channel sensitivities, from its I-frame (rate-distortion optimisation)
        self.track_bits = track_bits
        self.ideal_bits = 0.0  # −Σ log2 p of everything encoded so far (when track_bits)
        self.motion = MotionPFrames(model, self.level) if model.cfg.motion else None

    @torch.inference_mode()
    def analysis(self, frame: np.ndarray) -> np.ndarray:
        """The frame's scaled latent before quantization (C, h, w) float32."""
        return self.model.analysis(_to_tensor(frame, self.model.cfg.stride), self._levels)[0].numpy()

    def latent(self, frame: np.ndarray) -> np.ndarray:
        """The quantized latent this encoder would code for ``frame`` as an I-frame."""
        return self.coders.intra.fit(np.round(self.analysis(frame)).astype(np.int64), Condition(self.level))[0]

    def choose(self, y: np.ndarray) -> Decision:
        """What to code for the scaled latent ``y`` of the next frame: an I-frame's latent fitted to its coder, or
        the P-frame latent the encoder's rule chooses with the contexts it chose it under."""
        condition = self.state.condition(self.level)
        if condition.intra:
            latent, params = self.coders.intra.fit(np.round(y).astype(np.int64), condition)
            if self.rule.uses_rd and self.state.gop > 1:
                self._weights = synthesis_sensitivity(self.model, torch.from_numpy(latent).float()[None], self._levels)
            return Decision(self.coders.intra, latent, params)
        latent, params = self.coders.p.choose(torch.from_numpy(y)[None], condition, self.rule, self._weights)
        return Decision(self.coders.p, latent, params)

    def encode(self, frame: np.ndarray, key: int = 0) -> tuple[int, bytes]:
        """(frame type, ANS payload) of the next frame; ``key``: the stream key of the header it goes under
        (the payload ends with the latent checksum of its position and latent)."""
        if self.motion is not None:
            return self._encode_motion(frame, key)
        st = self.state
        y_hat, payload, bits = self._latent_frame(frame, key)
        ftype = st.frame_type  # the coded frame's: the state moves on only below
        self.ideal_bits += bits
        st.advance(y_hat)
        return ftype, payload

    def _latent_frame(self, frame: np.ndarray, key: int) -> tuple[np.ndarray, bytes, float]:
        """(latent, ANS payload, ideal bits when tracked) of the next frame coded in latent space: an I-frame, or
        a P-frame around the previous decoded latent; the group's state is not moved on."""
        d = self.choose(self.analysis(frame))
        check = bs.latent_checksum(d.latent, self.state.index, key)
        bits = d.codec.bits(d.latent, d.params) if self.track_bits else 0.0
        return d.latent, pack(d.codec, d.latent, d.params, check), bits

    def _cost(self, frame: np.ndarray, decoded: torch.Tensor, payload: bytes, ftype: int) -> float:
        """The training loss of a coded frame times its pixels: λ·255²·MSE·pixels + bits (on disk)."""
        h, w = frame.shape[:2]
        err = (decoded[:h, :w].numpy().astype(np.float64) - frame) / 255.0
        lam = self.model.cfg.lambdas[self.level]
        return lam * 255.0**2 * float(np.mean(err**2)) * h * w + 8 * bs.chunk_size(payload, ftype, bs.VERSION_MOTION)

    def _encode_motion(self, frame: np.ndarray, key: int) -> tuple[int, bytes]:
        """:meth:`encode` for a motion model. An I-frame as always (its decoded frame the group's first
        reference). At a P position the motion-compensated frame (M, :class:`common.motion.residual.MotionPFrames`)
        and, where at least half of the blocks stand still (a fixed camera), the latent P-frame around the
        group's last latent too: the one of lower rate–distortion cost is coded; both ends keep both states."""
        st = self.state
        ftype, index = st.frame_type, st.index
        if ftype == bs.FRAME_INTRA:
            y_hat, payload, bits = self._latent_frame(frame, key)
            self.motion.reset(intra_frame(self.model, y_hat, self._levels))
        else:
            padded = torch.from_numpy(_padded(frame, self.model.cfg.stride))
            check = lambda y, d: bs.motion_checksum(y, d, index, key)  # noqa: E731
            trial = self.motion.trial(padded, self.rule, check)
            ftype, payload, bits, y_hat = bs.FRAME_MOTION, trial.payload, trial.bits, None
            if trial.still_share >= 0.5:
                latent, l_payload, l_bits = self._latent_frame(frame, key)
                decoded = intra_frame(self.model, latent, self._levels)
                motion_cost = self._cost(frame, trial.decoded, trial.payload, bs.FRAME_MOTION)
                if self._cost(frame, decoded, l_payload, bs.FRAME_PREDICTED) < motion_cost:
                    ftype, payload, bits, y_hat = bs.FRAME_PREDICTED, l_payload, l_bits, latent
            if ftype == bs.FRAME_MOTION:
                trial.commit()
            else:
                self.motion.follow(decoded)
        self.ideal_bits += bits if self.track_bits else 0.0
        st.advance(y_hat)
        return ftype, payload


@torch.inference_mode()
def intra_frame(model: FedlvcCodec, y_hat: np.ndarray, levels: torch.Tensor) -> torch.Tensor:
    """The padded decoded frame (H, W, 3) uint8 of an I-frame latent (a motion model's reference)."""
    y = torch.from_numpy(y_hat).float()[None].contiguous(memory_format=torch.channels_last)
    return to_uint8(model.synthesis(y, levels))[0].contiguous()


class FrameDecoder:
    """Decodes the chunk payloads of a stream of ``version`` under the header with stream ``key``."""

    def __init__(
        self,
        model: FedlvcCodec,
        quality: int,
        height: int,
        width: int,
        gop: int = 1,
        version: int = bs.VERSION,
        key: int = 0,
    ):
        model.check_level(quality - 1)
        if gop > 1 and not model.cfg.temporal:
            raise FedlvcError("the bitstream has P-frames but the model is intra-only (no temporal prior)")
        self.state = _GroupState(gop)
        self.model, self.level = model.eval(), quality - 1
        self.height, self.width = height, width
        ph, pw = padded_size(height, width, model.cfg.stride)
        s = model.cfg.stride
        self.shape = (model.cfg.latent_channels, ph // s, pw // s)
        self.coders = LatentCoders(model)
        self._levels = torch.tensor([self.level])
        self.version, self.key = version, key
        self.motion = MotionPFrames(model, self.level) if model.cfg.motion else None

    @property
    def max_payload(self) -> int:
        c, h, w = self.shape
        hyper = self.model.cfg.hyper_channels * -(-h // 4) * -(-w // 4)  # ẑ of an I-frame (v4)
        vectors = 2 * h * w if self.model.cfg.motion else 0  # a motion P-frame's block vectors
        return bs.max_payload_bytes(c * h * w + max(hyper, vectors))

    def seek(self, index: int) -> None:
        """Continue at frame ``index``, which must be an I-frame."""
        if bs.frame_type_at(index, self.state.gop) != bs.FRAME_INTRA:
            raise ValueError("decoding can only start at an I-frame")
        self.state = _GroupState(self.state.gop)
        self.state.index = index

    @property
    def frame_type(self) -> int:
        return self.state.frame_type

    def decode_latent(self, payload: bytes, frame_type: int | None = None):
        """Entropy-decode the next frame's latent (and move on); all that is needed of a frame that is only
        a reference for the frames after it. For a motion model, whose references are decoded frames, the
        padded decoded frame (H', W', 3) uint8 instead. ``frame_type``: the chunk's (its position's if None)."""
        st = self.state
        index = st.index
        frame_type = st.frame_type if frame_type is None else frame_type
        if frame_type == bs.FRAME_MOTION:
            decoded = self.motion.unpack(payload, self.shape, lambda y, d: bs.motion_checksum(y, d, index, self.key))
            st.advance(None)
            return decoded
        check = None if self.version < 3 else (lambda y: bs.latent_checksum(y, index, self.key))
        condition = st.condition(self.level)
        y_hat = self.coders.latent(payload, condition, self.shape, check)
        if self.motion is None:
            st.advance(y_hat)
            return y_hat
        decoded = intra_frame(self.model, y_hat, self._levels)
        self.motion.reset(decoded) if frame_type == bs.FRAME_INTRA else self.motion.follow(decoded)
        st.advance(y_hat)
        return decoded

    def decode(self, payload: bytes) -> np.ndarray:
        return self.reconstruct(self.decode_latent(payload))

    @torch.inference_mode()
    def reconstruct(self, y_hat) -> np.ndarray:
        """The frame of a decoded latent (a motion model: of its padded decoded frame)."""
        if self.motion is not None:
            return y_hat[: self.height, : self.width].numpy().copy()
        y = torch.from_numpy(y_hat).float()[None].contiguous(memory_format=torch.channels_last)
        return _to_frame(self.model.synthesis(y, self._levels), self.height, self.width)


def encode_frames(
    frames: Iterable[np.ndarray],
    output: str | os.PathLike,
    model: FedlvcCodec,
    quality: int,
    fps: Fraction,
    gop: int = 1,
    progress: tqdm | None = None,
    rule: PFrameRule | None = None,
) -> dict:
    """Write ``frames`` (RGB uint8, all one size) as a ``.lvc`` file at ``output`` (atomically); ``rule``:
    the P-frame quantization (None: :data:`DEFAULT_P_RULE`)."""
    encoder = FrameEncoder(model, quality, track_bits=True, gop=gop, rule=DEFAULT_P_RULE if rule is None else rule)
    fp = fingerprint(model)
    count, size, header = 0, None, None
    frames_by_type, bytes_by_type, motion_frames = {"I": 0, "P": 0}, {"I": 0, "P": 0}, 0
    with atomic_output(output) as tmp, open(tmp, "wb") as f:
        f.write(bytes(bs.HEADER_SIZE))  # placeholder, rewritten once the frame count is known
        for frame in frames:
            if size is None:
                size = frame.shape[:2]
                header = bs.StreamHeader(
                    fp, quality, size[1], size[0], Fraction(fps), 0, gop, bs.version_for(model.cfg)
                )
            elif frame.shape[:2] != size:
                raise FedlvcError(
                    f"frame {count} has size {frame.shape[1]}x{frame.shape[0]}, "
                    f"expected {size[1]}x{size[0]} (size changes are not supported)"
                )
            ftype, payload = encoder.encode(frame, header.stream_key)
            name = "I" if ftype == bs.FRAME_INTRA else "P"  # a motion-compensated frame (M) is a P-frame
            bytes_by_type[name] += bs.write_chunk(f, payload, ftype, header.version)
            frames_by_type[name] += 1
            motion_frames += ftype == bs.FRAME_MOTION
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
    return {
        "frames": count,
        "width": size[1],
        "height": size[0],
        "quality": quality,
        "gop": gop,
        "bytes": total,
        "bpp": total * 8 / pixels,
        "ideal_bpp": encoder.ideal_bits / pixels,
        "frames_by_type": frames_by_type,
        **({"motion_frames": motion_frames} if model.cfg.motion else {}),
        "chunk_bytes_by_type": bytes_by_type,
    }


def default_gop(model: FedlvcCodec) -> int:
    return DEFAULT_GOP if model.cfg.temporal else 1


def compress_file(
    input_path,
    output_path,
    model: FedlvcCodec,
    quality: int = 4,
    gop: int | None = None,
    progress: bool = False,
    rule: PFrameRule | None = None,
) -> dict:
    """Compress any video PyAV reads into ``output_path`` (.lvc); ``gop`` None: the model's default (an
    I-frame every DEFAULT_GOP frames, or 1 for an intra-only model)."""
    gop = default_gop(model) if gop is None else gop
    out = Path(output_path)
    if out.suffix.lower() != ".lvc":
        raise FedlvcError(f"the compressed output must end in .lvc: {out}")
    check_output_path(out, (".lvc",), source=input_path)
    info = probe(input_path)
    with tqdm(total=info.frames, desc="compress", unit="frame", disable=not progress) as bar:
        return encode_frames(iter_frames(input_path), out, model, quality, info.fps, gop, bar, rule)


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
    if header.version not in bs.readable_by(model.cfg):
        raise FedlvcError(
            f"bitstream version {header.version} cannot be decoded with a model of architecture "
            f"{model.cfg.architecture!r}"
        )
    fp = fingerprint(model)
    if header.fingerprint != fp:
        raise FedlvcError(
            f"the bitstream was made by a different model (fingerprint {header.fingerprint.hex()[:12]}, "
            f"loaded model {fp.hex()[:12]}); pass the right --model"
        )
    if not 1 <= header.quality <= model.cfg.num_levels:
        raise FedlvcError(f"bitstream quality {header.quality} is out of range 1..{model.cfg.num_levels}")


def decode_stream(
    path, model: FedlvcCodec, start: int = 0, count: int | None = None
) -> tuple[bs.StreamHeader, Iterator[np.ndarray]]:
    """Parse and check the header now; return it and a generator of decoded frames (one at a time).

    ``start``/``count`` select frames start .. start+count-1 (random access): the payloads of the chunks
    before the I-frame that opens ``start``'s group are skipped unread (their chunk heads are still checked:
    type and length), decoding runs from that I-frame and stops after the last requested frame."""
    f, header, size = open_stream(path)
    try:
        check_model(header, model)
        if start < 0 or start >= header.frames:
            raise FedlvcError(f"--start {start} is outside the stream's frames 0..{header.frames - 1}")
        if count is not None and count < 1:
            raise FedlvcError("--frames must be at least 1")
        decoder = FrameDecoder(
            model, header.quality, header.height, header.width, header.gop, header.version, header.stream_key
        )
    except BaseException:
        f.close()
        raise
    end = header.frames if count is None else min(header.frames, start + count)
    first = start - start % header.gop  # the I-frame that opens start's group

    def frames():
        with f:
            pos = bs.HEADER_SIZE
            for i in range(first):
                pos += bs.skip_chunk(
                    f, i, size - pos, decoder.max_payload, bs.frame_type_at(i, header.gop), header.version
                )
            decoder.seek(first)
            for i in range(first, end):
                payload, n, ftype = bs.read_frame_chunk(
                    f, i, size - pos, decoder.max_payload, header.stream_key, decoder.frame_type, header.version
                )
                pos += n
                try:
                    y_hat = decoder.decode_latent(payload, ftype)
                except FedlvcError as e:
                    raise FedlvcError(f"frame {i}: {e}") from None
                if i >= start:  # (a frame before start in its group is only a reference)
                    yield decoder.reconstruct(y_hat)
            if end == header.frames and pos != size:
                raise FedlvcError(f"bitstream has {size - pos} unexpected bytes after frame {header.frames - 1}")

    return replace(header, frames=end - start) if (start, end) != (0, header.frames) else header, frames()


def decompress_file(
    input_path, output_path, model: FedlvcCodec, progress: bool = False, start: int = 0, count: int | None = None
) -> dict:
    """Decode a ``.lvc`` file (or frames start .. start+count-1 of it) to ``.mkv`` (FFV1 RGB), ``.y4m`` or
    ``.mp4``; no output is left on error."""
    check_output_path(output_path, source=input_path)
    header, frames = decode_stream(input_path, model, start, count)
    with (
        VideoWriter(output_path, header.width, header.height, header.fps) as writer,
        tqdm(total=header.frames, desc="decompress", unit="frame", disable=not progress) as bar,
    ):
        for frame in frames:
            writer.write(frame)
            bar.update(1)
    return {
        "frames": header.frames,
        "width": header.width,
        "height": header.height,
        "quality": header.quality,
        "gop": header.gop,
        "start": start,
    }
