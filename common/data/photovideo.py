"""Training video from the photo corpus (:mod:`common.data.corpus`): a camera moving over a real photograph (pan,
zoom, hand shake), objects cut from other photographs moving across it, sensor noise, and, for some clips,
the artefacts of a lossy source (x264). Each clip is a deterministic function of the photo list, its index
and the seed.

About a tenth of the photographs (chosen by a hash of the file name, so the split never changes as photos are
added) are held out of pre-training: the simulated sites of later studies can film scenes the public model
never saw.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from common.errors import FedlvcError

from .baselines import encode_baseline
from .clips import bounce
from .video import write_video

HELD_OUT_SHARE = 10  # one photograph in ten, by name


def corpus_photos(folder: str | os.PathLike, held_out: bool = False) -> list[Path]:
    """The photographs of a corpus folder (its ``MANIFEST.tsv``): the pre-training ones, or the held-out ones."""
    folder = Path(folder)
    manifest = folder / "MANIFEST.tsv"
    if not manifest.is_file():
        raise FedlvcError(f"{folder} holds no photo corpus (no MANIFEST.tsv; fedlvc public-data --fetch makes one)")
    with open(manifest, newline="") as f:
        names = [row["file"] for row in csv.DictReader(f, delimiter="\t")]
    chosen = [folder / n for n in sorted(names) if is_held_out(n) == held_out]
    if not chosen:
        raise FedlvcError(f"the photo corpus in {folder} is empty")
    return chosen


def is_held_out(name: str) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % HELD_OUT_SHARE == 0


def load_photo(path: Path, short_side: int) -> np.ndarray:
    """RGB uint8 with its shorter side scaled to ``short_side`` (a 2-4x downscale of most corpus photos, which
    also removes their JPEG block artefacts)."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = short_side / min(im.size)
        if scale < 1:
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.LANCZOS)
        return np.asarray(im)


@dataclass
class Sprite:
    """An object cut from a photograph (RGB and a soft elliptical alpha) and its path across the frame."""

    rgb: np.ndarray
    alpha: np.ndarray  # (h, w, 1) in [0, 1]
    start: np.ndarray  # (y, x) of its top-left corner at the first frame, in frame pixels
    end: np.ndarray


def _sprite(rng, photo: np.ndarray, width: int, height: int) -> Sprite:
    size = int(min(width, height) * rng.uniform(0.15, 0.45))
    h, w = min(size, photo.shape[0]), min(int(size * rng.uniform(0.6, 1.4)), photo.shape[1])
    y, x = rng.integers(0, photo.shape[0] - h + 1), rng.integers(0, photo.shape[1] - w + 1)
    yy, xx = np.mgrid[0:h, 0:w]
    r = ((yy - (h - 1) / 2) / (h / 2)) ** 2 + ((xx - (w - 1) / 2) / (w / 2)) ** 2
    alpha = np.clip((1.0 - r) * 4, 0, 1)[..., None]  # an ellipse with a soft edge
    lo, hi = np.array([-h / 2, -w / 2]), np.array([height - h / 2, width - w / 2])
    return Sprite(photo[y : y + h, x : x + w].astype(np.float32), alpha, rng.uniform(lo, hi), rng.uniform(lo, hi))


def _paste(frame: np.ndarray, sprite: Sprite, t: float) -> None:
    y, x = np.rint(sprite.start * (1 - t) + sprite.end * t).astype(int)
    h, w = sprite.rgb.shape[:2]
    y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + h, frame.shape[0]), min(x + w, frame.shape[1])
    if y1 <= y0 or x1 <= x0:
        return
    a = sprite.alpha[y0 - y : y1 - y, x0 - x : x1 - x]
    frame[y0:y1, x0:x1] = frame[y0:y1, x0:x1] * (1 - a) + sprite.rgb[y0 - y : y1 - y, x0 - x : x1 - x] * a


def _camera(rng, frames: int, bh: int, bw: int, width: int, height: int):
    """Per frame (top, left, view width, view height) of the camera's view in the photograph."""
    # The view never exceeds the photograph (a zoom-out past its edge would leave the picture).
    zoom = np.minimum(np.exp(np.linspace(0, rng.uniform(-0.25, 0.25), frames)) * rng.uniform(0.7, 1.0), 1.0)
    view_w = np.minimum(bw, bh * width / height) * zoom
    view_h = view_w * height / width
    start, end = rng.uniform(0, 1, 2), rng.uniform(0, 1, 2)
    if rng.random() < 0.3:  # a still camera
        end = start
    shake = rng.normal(0, rng.uniform(0, 1.5), (frames, 2)).cumsum(0) * 0.3 if rng.random() < 0.5 else 0
    t = np.linspace(0, 1, frames)[:, None]
    frac = start * (1 - t) + end * t
    top = frac[:, 0] * (bh - view_h) + (shake[:, 0] if np.ndim(shake) else 0)
    left = frac[:, 1] * (bw - view_w) + (shake[:, 1] if np.ndim(shake) else 0)
    return np.clip(top, 0, bh - view_h), np.clip(left, 0, bw - view_w), view_w, view_h


def photo_clip(photos: list[Path], index: int, width: int = 256, height: int = 192, frames: int = 32,
               seed: int = 0) -> np.ndarray:  # fmt: skip
    """Clip ``index``: (frames, height, width, 3) uint8, from ``photos`` (see the module docstring)."""
    from PIL import Image

    rng = np.random.default_rng([seed, index])
    short = int(min(width, height) * rng.uniform(1.5, 3.0))
    background = load_photo(photos[rng.integers(len(photos))], short)
    sprites = [_sprite(rng, load_photo(photos[rng.integers(len(photos))], short), width, height)
               for _ in range(rng.choice([0, 1, 1, 2, 3]))]  # fmt: skip
    top, left, view_w, view_h = _camera(rng, frames, *background.shape[:2], width, height)
    image = Image.fromarray(background)
    read_noise, shot_gain = (rng.uniform(0, 2.5), rng.uniform(0, 0.4)) if rng.random() < 0.7 else (0.0, 0.0)
    out = np.empty((frames, height, width, 3), np.uint8)
    for i in range(frames):
        box = (left[i], top[i], left[i] + view_w[i], top[i] + view_h[i])
        frame = np.asarray(image.resize((width, height), Image.BICUBIC, box=box), dtype=np.float32)
        for s in sprites:
            _paste(frame, s, i / max(frames - 1, 1))
        if read_noise or shot_gain:
            frame += rng.normal(0, 1, frame.shape) * np.sqrt(read_noise**2 + shot_gain * np.clip(frame, 0, 255))
        out[i] = np.clip(np.rint(frame), 0, 255)
    if rng.random() < 0.5:  # a lossy source: what a camera or a recorder did to the picture
        out = encode_baseline(out, "x264", int(rng.integers(18, 31)), Fraction(25)).decoded
    return out


def write_photo_clips(photos: list[Path], outdir: str | os.PathLike, clips: int, frames: int = 32, width: int = 256,
                      height: int = 192, seed: int = 0, progress=None) -> list[Path]:  # fmt: skip
    """``clips`` training clips from ``photos`` as FFV1 ``.mkv`` (lossless) in ``outdir``; an existing clip
    is kept, so an interrupted run resumes."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(clips):
        path = out / f"photo_{i:04d}.mkv"
        if not path.exists():
            write_video(path, photo_clip(photos, i, width, height, frames, seed), Fraction(25))
        paths.append(path)
        if progress:
            progress()
    return paths


@functools.lru_cache(maxsize=256)
def _photo_scene(photos: tuple, site: int, clip: int, width: int, height: int, clip_frames: int):
    """(background uint8, camera path, sprites, noise) of one clip of a photo site. Cached for 256 clips (about
    0.2 MB each at 160x120): training draws a site's rows at random across all its clips, and decoding and
    downscaling a photograph costs far more than rendering a frame from it."""
    from PIL import Image

    rng = np.random.default_rng([site, clip, 31337])
    short = int(max(width, height) * rng.uniform(1.1, 1.4))
    image = load_photo(photos[int(rng.integers(len(photos)))], short)
    if image.shape[0] < height + 2 or image.shape[1] < width + 2:  # a small photograph: scaled up to cover
        scale = max((height + 2) / image.shape[0], (width + 2) / image.shape[1])
        size = (int(np.ceil(image.shape[1] * scale)), int(np.ceil(image.shape[0] * scale)))
        image = np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC))
    margin = np.array(image.shape[:2]) - (height, width)
    start = rng.uniform(0, 1, 2) * margin
    end = rng.uniform(0, 1, 2) * margin if rng.random() < 0.4 else start  # most cameras are fixed
    sprites = [_sprite(rng, load_photo(photos[int(rng.integers(len(photos)))], short), width, height)
               for _ in range(int(rng.choice([0, 1, 1, 2, 3])))]  # fmt: skip
    noise = (rng.uniform(0.5, 2.5), rng.uniform(0.0, 0.3))
    return image, (start, end), sprites, noise


def photo_site_frame(photos: tuple, site: int, clip: int, t: int, width: int, height: int, clip_frames: int):
    """Frame ``t`` of clip ``clip`` of a simulated site filming photographs (the corpus' held-out ones): a fixed or
    slowly panning camera over a real scene, objects cut from other photographs crossing it back and forth,
    slow light changes, sensor noise. Closed form in ``t``, so a site of any length is generated on demand."""
    image, (start, end), sprites, (read_noise, shot_gain) = _photo_scene(photos, site, clip, width, height, clip_frames)
    phase = float(bounce(t / clip_frames, 1.0))  # 0 → 1 → 0 over two clip lengths
    top, left = np.rint(start + (end - start) * phase).astype(int)
    light = 1.0 + 0.03 * np.sin(2 * np.pi * (t / 120.0 + site))
    frame = image[top : top + height, left : left + width].astype(np.float32) * light
    for k, sprite in enumerate(sprites):
        _paste(frame, sprite, float(bounce(t / (clip_frames / (k + 1)), 1.0)))
    rng = np.random.default_rng([site, clip, t, 7])
    frame = frame + rng.normal(0, 1, frame.shape) * np.sqrt(read_noise**2 + shot_gain * np.clip(frame, 0, 255))
    return np.clip(np.rint(frame), 0, 255).astype(np.uint8)
