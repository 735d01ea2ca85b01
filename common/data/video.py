"""Video I/O with PyAV: streamed decoding of anything FFmpeg reads, and atomic writing of outputs.

Frames are numpy arrays of shape (H, W, 3), dtype uint8, RGB.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from common.errors import FedlvcError

DEFAULT_FPS = Fraction(25)
TEXT_DEMUXERS = {"tty"}
TEXT_CODECS = {"ansi", "bintext", "xbin", "idf"}


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    fps: Fraction
    frames: int | None  # as the container declares it; None when unknown


def _open_input(path: str | os.PathLike):
    p = Path(path)
    if not p.exists():
        raise FedlvcError(f"input not found: {p}")
    if p.is_dir():
        raise FedlvcError(f"input is a directory, not a video file: {p}")
    if p.stat().st_size == 0:
        raise FedlvcError(f"input is empty: {p}")
    try:
        container = av.open(str(p), mode="r")
    except (av.FFmpegError, OSError, UnicodeDecodeError, ValueError) as e:
        raise FedlvcError(f"cannot read {p} as a video: {e}") from None
    if not container.streams.video:
        container.close()
        raise FedlvcError(f"{p} has no video stream")
    if container.format.name in TEXT_DEMUXERS or container.streams.video[0].codec_context.name in TEXT_CODECS:
        container.close()  # FFmpeg renders any text file as "video" (its tty demuxer); that is not a video
        raise FedlvcError(f"{p} is a text file, not a video")
    return container


def probe(path: str | os.PathLike) -> VideoInfo:
    """Size, frame rate and declared frame count of the first video stream (does not decode)."""
    with _open_input(path) as container:
        s = container.streams.video[0]
        fps = s.average_rate or s.guessed_rate or DEFAULT_FPS
        frames = s.frames or None
        if not s.codec_context.width or not s.codec_context.height:
            raise FedlvcError(f"{path} has a video stream without a frame size")
        return VideoInfo(s.codec_context.width, s.codec_context.height, Fraction(fps), frames)


def iter_frames(path: str | os.PathLike, max_frames: int | None = None, start: int = 0) -> Iterator[np.ndarray]:
    """Decode frames one at a time as RGB uint8 (H, W, 3); memory does not grow with the clip length."""
    count = 0
    with _open_input(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for i, frame in enumerate(container.decode(stream)):
                if i < start:
                    continue
                if max_frames is not None and count >= max_frames:
                    return
                yield frame.to_ndarray(format="rgb24")
                count += 1
        except av.FFmpegError as e:
            raise FedlvcError(f"decoding {path} failed after {count} frames: {e}") from None
    if count == 0 and start == 0:
        raise FedlvcError(f"{path} contains no decodable video frames")


def read_frames(path: str | os.PathLike, max_frames: int | None = None, start: int = 0) -> np.ndarray:
    """All (or ``max_frames``) frames of a clip as one (T, H, W, 3) uint8 array."""
    return np.stack(list(iter_frames(path, max_frames, start)))


# Output formats by suffix: (container format, codec, pixel format, codec options).
OUTPUT_FORMATS = {
    ".mkv": ("matroska", "ffv1", "bgr0", {}),  # lossless RGB
    ".y4m": ("yuv4mpegpipe", "rawvideo", "yuv444p", {}),  # raw, full chroma
    ".mp4": ("mp4", "libx264", "yuv444p", {"crf": "10", "preset": "medium"}),  # high quality, odd sizes allowed
}


def check_output_path(path: str | os.PathLike, suffixes=tuple(OUTPUT_FORMATS), source=None) -> Path:
    """Refuse an output whose folder is missing, whose suffix we cannot write, or that is the input ``source``
    (when given), before any work."""
    p = Path(path)
    if p.suffix.lower() not in suffixes:
        raise FedlvcError(f"cannot write {p}: the output must end in one of {', '.join(suffixes)}")
    if not p.parent.is_dir():
        raise FedlvcError(f"output folder does not exist: {p.parent}")
    if p.is_dir():
        raise FedlvcError(f"output is a directory: {p}")
    if source is not None and _same_file(source, p):
        raise FedlvcError("the output would overwrite the input")
    return p


def _same_file(a, b) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve() or os.path.samefile(a, b)
    except OSError:
        return False


@contextmanager
def atomic_output(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".part", dir=p.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the output gets the usual permissions
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class VideoWriter:
    """Writes RGB frames to ``.mkv`` (FFV1, lossless RGB), ``.y4m`` or ``.mp4`` (x264); the file appears
    at ``path`` only when :meth:`close` completes (use as a context manager)."""

    def __init__(self, path: str | os.PathLike, width: int, height: int, fps: Fraction = DEFAULT_FPS):
        self.path = check_output_path(path)
        fmt, codec, pix_fmt, options = OUTPUT_FORMATS[self.path.suffix.lower()]
        self._atomic = atomic_output(self.path)
        self._tmp = self._atomic.__enter__()
        try:
            self._container = av.open(str(self._tmp), mode="w", format=fmt)
            self._stream = self._container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001 * 1000))
            self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, pix_fmt
            self._stream.options = dict(options)
        except BaseException as e:
            self._atomic.__exit__(type(e), e, None)
            raise
        self._index = 0

    def write(self, frame: np.ndarray) -> None:
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        vf.pts = self._index
        self._index += 1
        for packet in self._stream.encode(vf):
            self._container.mux(packet)

    def close(self) -> None:
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        self._atomic.__exit__(None, None, None)

    def abort(self, exc: BaseException) -> None:
        try:
            self._container.close()
        except Exception:
            pass
        self._atomic.__exit__(type(exc), exc, None)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None:
            self.close()
        else:
            self.abort(exc)
        return False


def write_video(path: str | os.PathLike, frames, fps: Fraction = DEFAULT_FPS) -> None:
    """Write an iterable of RGB frames (all the same size)."""
    it = iter(frames)
    first = next(it)
    h, w = first.shape[:2]
    with VideoWriter(path, w, h, fps) as writer:
        writer.write(first)
        for f in it:
            writer.write(f)
