"""x264 / x265 baselines through PyAV, on exactly the frames fedlvc codes.

The whole container (mp4) is counted as the rate, like fedlvc's whole ``.lvc`` file. Frames are converted
RGB → yuv420p by FFmpeg (odd sizes are edge-padded to even and cropped back after decoding) and decoded
back to RGB, so both codecs are measured with the same PSNR-RGB and MS-SSIM code against the same
reference frames.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

BASELINES = {
    # name: (codec, extra options)
    "x264": ("libx264", {"preset": "medium"}),
    "x264-intra": ("libx264", {"preset": "medium", "x264-params": "keyint=1:min-keyint=1:scenecut=0"}),
    "x265": ("libx265", {"preset": "medium", "x265-params": "log-level=error"}),
}
DEFAULT_CRFS = (18, 23, 28, 33, 38)


@dataclass
class BaselineResult:
    name: str
    crf: int
    bytes: int
    bpp: float
    encode_seconds: float
    decoded: np.ndarray


def encode_baseline(frames: np.ndarray, name: str, crf: int, fps: Fraction = Fraction(25)) -> BaselineResult:
    """Encode (T, H, W, 3) uint8 RGB frames with baseline ``name`` at ``crf``; decode them back."""
    codec, options = BASELINES[name]
    t, h, w = frames.shape[:3]
    ph, pw = h + h % 2, w + w % 2
    buf = io.BytesIO()
    start = time.perf_counter()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1_000_000))
        stream.width, stream.height, stream.pix_fmt = pw, ph, "yuv420p"
        stream.options = dict(options, crf=str(crf))
        last_dts = [None]

        def mux(packets):
            for packet in packets:
                # libx265 through FFmpeg now and then hands back a packet with an uninitialised DTS on very
                # short clips, which the mp4 muxer refuses: give it a sane, increasing one.
                dts, pts, last = packet.dts, packet.pts, last_dts[0]
                if pts is not None and (
                    dts is None or dts > pts or dts < pts - 64 or (last is not None and dts <= last)
                ):
                    packet.dts = pts if last is None or pts > last else last + 1
                last_dts[0] = packet.dts
                out.mux(packet)

        for i, frame in enumerate(frames):
            if (ph, pw) != (h, w):
                frame = np.pad(frame, ((0, ph - h), (0, pw - w), (0, 0)), mode="edge")
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            vf.pts = i
            mux(stream.encode(vf))
        mux(stream.encode(None))
    seconds = time.perf_counter() - start
    data = buf.getvalue()
    with av.open(io.BytesIO(data)) as inp:
        decoded = np.stack([f.to_ndarray(format="rgb24")[:h, :w] for f in inp.decode(video=0)])
    if decoded.shape[0] != t:
        raise RuntimeError(f"{name} decoded {decoded.shape[0]} frames, expected {t}")
    return BaselineResult(name, crf, len(data), len(data) * 8 / (t * h * w), seconds, decoded)
