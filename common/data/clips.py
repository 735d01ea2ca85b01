"""Training data: generated site clips, public camera pans over the stills scikit-image ships, and the
map-style datasets DP-SGD samples from: one row = one privacy unit, a frame (:class:`FrameCrops`) or a
segment of consecutive frames (:class:`SegmentCrops`)."""

from __future__ import annotations

import functools
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from common.errors import FedlvcError

from .video import iter_frames, write_video

VIDEO_SUFFIXES = (".mkv", ".mp4", ".avi", ".mov", ".webm", ".y4m", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".gif")

SITE_KINDS = ("classroom", "street", "corridor", "park")


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bilinearly."""
    gh, gw = h // cell + 2, w // cell + 2
    g = rng.random((gh, gw))
    ys = np.linspace(0, gh - 1.001, h)
    xs = np.linspace(0, gw - 1.001, w)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    a, b = g[y0][:, x0], g[y0][:, x0 + 1]
    c, d = g[y0 + 1][:, x0], g[y0 + 1][:, x0 + 1]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def _scene(rng: np.random.Generator, h: int, w: int, kind: str) -> np.ndarray:
    """A static background in [0, 255] float: gradient, textured blocks (walls, desks, cars, trees)."""
    palettes = {
        "classroom": ([200, 180, 150], [120, 90, 60]),
        "street": ([150, 170, 200], [80, 80, 85]),
        "corridor": ([220, 220, 210], [140, 130, 120]),
        "park": ([140, 190, 230], [60, 120, 50]),
    }
    top, bottom = (np.array(c, float) for c in palettes[kind])
    t = np.linspace(0, 1, h)[:, None, None]
    img = top * (1 - t) + bottom * t + np.zeros((h, w, 3))
    img += 40 * (_smooth_noise(rng, h, w, 24)[..., None] - 0.5)
    for _ in range(int(rng.integers(6, 14))):
        bh, bw = int(rng.integers(h // 10, h // 2)), int(rng.integers(w // 10, w // 2))
        y, x = int(rng.integers(0, h - bh)), int(rng.integers(0, w - bw))
        color = rng.uniform(30, 230, 3)
        tex = 30 * (_smooth_noise(rng, bh, bw, int(rng.integers(3, 12)))[..., None] - 0.5)
        block = color + tex
        if rng.random() < 0.5:  # windows, shelves or stripes
            period = int(rng.integers(4, 16))
            block[::period, :] *= 0.6
        img[y : y + bh, x : x + bw] = block
    return np.clip(img, 0, 255)


def generate_site_clip(site: int, clip: int, width: int = 320, height: int = 240, frames: int = 120):
    """Yield the frames of one deterministic clip of a site: a fixed camera on a scene of the site's kind
    with people/vehicles moving through it, slow light changes and sensor noise. Distinct per site."""
    kind = SITE_KINDS[site % len(SITE_KINDS)]
    rng = np.random.default_rng([site, clip, 7919])
    pan = kind == "park"  # one kind has a slowly panning camera
    canvas_w = width + (frames if pan else 0)
    background = _scene(rng, height, canvas_w, kind)
    movers = []
    speed = {"classroom": 0.8, "street": 3.0, "corridor": 1.5, "park": 1.0}[kind]
    for _ in range(int(rng.integers(2, 7))):
        r = rng.uniform(height / 20, height / 7, 2)
        movers.append(
            {
                "pos": rng.uniform([0, 0], [height, width]),
                "vel": rng.normal(0, speed, 2),
                "r": r,
                "color": rng.uniform(20, 235, 3),
            }
        )
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for t in range(frames):
        x0 = t if pan else 0
        frame = background[:, x0 : x0 + width].copy()
        frame *= 1.0 + 0.03 * np.sin(2 * np.pi * (t / 90.0 + site))
        for m in movers:
            cy, cx = m["pos"]
            mask = ((yy - cy) / m["r"][0]) ** 2 + ((xx - cx) / m["r"][1]) ** 2 <= 1.0
            frame[mask] = m["color"]
            m["pos"] = m["pos"] + m["vel"]
            for k, lim in ((0, height), (1, width)):
                if not 0 <= m["pos"][k] <= lim:
                    m["vel"][k] *= -1
        frame += rng.normal(0, 1.5, frame.shape)
        yield np.clip(np.rint(frame), 0, 255).astype(np.uint8)


def bounce(x, lim):
    """Positions of a point moving at constant velocity inside [0, lim], reflected at the walls (closed form)."""
    y = np.mod(x, 2 * lim)
    return np.where(y > lim, 2 * lim - y, y)


@functools.lru_cache(maxsize=8)
def _streamed_clip_setup(site: int, clip: int, width: int, height: int, clip_frames: int):
    """(background, movers, pan range) of one clip of a streamed site; a few clips' backgrounds cached."""
    kind = SITE_KINDS[site % len(SITE_KINDS)]
    rng = np.random.default_rng([site, clip, 7919])
    span = min(clip_frames, width) if kind == "park" else 0  # the park camera pans back and forth
    background = _scene(rng, height, width + span, kind).astype(np.float32)
    speed = {"classroom": 0.8, "street": 3.0, "corridor": 1.5, "park": 1.0}[kind]
    movers = [
        (
            rng.uniform([0, 0], [height, width]),
            rng.normal(0, speed, 2),
            rng.uniform(height / 20, height / 7, 2),
            rng.uniform(20, 235, 3),
        )  # fmt: skip
        for _ in range(int(rng.integers(2, 7)))
    ]
    return background, movers, span


def streamed_site_frame(site: int, clip: int, t: int, width: int, height: int, clip_frames: int) -> np.ndarray:
    """Frame ``t`` of clip ``clip`` of a streamed site, computed on its own (no earlier frame needed): the scenes
    of :func:`generate_site_clip` (a camera on a scene of the site's kind, movers bouncing through it, slow light
    changes, sensor noise) in closed form, so a site of any length is generated on demand, never held."""
    background, movers, span = _streamed_clip_setup(site, clip, width, height, clip_frames)
    x0 = int(bounce(np.array(float(t)), np.array(float(span)))) if span else 0
    frame = background[:, x0 : x0 + width] * (1.0 + 0.03 * np.sin(2 * np.pi * (t / 90.0 + site)))
    yy, xx = np.ogrid[0:height, 0:width]
    for pos, vel, r, color in movers:
        cy, cx = bounce(pos + vel * t, np.array([height, width], float))
        frame[((yy - cy) / r[0]) ** 2 + ((xx - cx) / r[1]) ** 2 <= 1.0] = color
    frame = frame + np.random.default_rng([site, clip, t, 104729]).normal(0, 1.5, frame.shape)
    return np.clip(np.rint(frame), 0, 255).astype(np.uint8)


def write_demo_data(
    outdir: str | os.PathLike,
    sites: int,
    clips: int = 2,
    frames: int = 120,
    width: int = 320,
    height: int = 240,
    progress=None,
    first_site: int = 0,
) -> list[Path]:
    """Write ``site_<k>/clip_<j>.mkv`` (FFV1 lossless) for sites k = first_site … first_site+sites−1;
    returns the site folders."""
    if sites < 1:
        raise FedlvcError("--sites must be at least 1")
    if first_site < 0:
        raise FedlvcError("--first-site must be >= 0")
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    folders = []
    for s in range(first_site, first_site + sites):
        folder = out / f"site_{s}"
        folder.mkdir(exist_ok=True)
        for c in range(clips):
            write_video(folder / f"clip_{c}.mkv", generate_site_clip(s, c, width, height, frames), Fraction(25))
            if progress:
                progress()
        folders.append(folder)
    return folders


def generated_site_frames(site: int, clips: int, frames: int, width: int, height: int) -> list[np.ndarray]:
    """All frames of a generated site (its clips one after the other)."""
    return [f for c in range(clips) for f in generate_site_clip(site, c, width, height, frames)]


def split_held_out(frames: list, held_out: int) -> tuple[list, list]:
    """(training frames, held-out frames): the last ``held_out`` frames are never trained on."""
    n = min(held_out, max(0, len(frames) - 1))
    return frames[: len(frames) - n], frames[len(frames) - n :]


PUBLIC_STILLS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "stereo_motorcycle",
    "retina",
    "camera",
    "brick",
    "grass",
    "gravel",
    "coins",
    "page",
    "moon",
    "text",
    "horse",
    "cell",
    "colorwheel",
    "logo",
    "clock",
)


def _public_still(name: str) -> np.ndarray:
    import skimage.data

    img = getattr(skimage.data, name)()
    img = np.asarray(img[0] if isinstance(img, tuple) else img)  # stereo pairs: the left view
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.dtype != np.uint8:
        img = np.clip(img * (255.0 if img.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return img[..., :3]


def generate_pan(image: np.ndarray, width: int, height: int, frames: int, seed: int):
    """A camera pan (with slow zoom) over a still image; frames of size (height, width)."""
    from skimage.transform import resize

    rng = np.random.default_rng(seed)
    h, w = image.shape[:2]
    scale = max(height / h, width / w) * rng.uniform(1.2, 2.0)
    big = (resize(image, (int(h * scale) + 1, int(w * scale) + 1), anti_aliasing=True) * 255).astype(np.float32)
    bh, bw = big.shape[:2]
    start = rng.uniform([0, 0], [bh - height, bw - width])
    end = rng.uniform([0, 0], [bh - height, bw - width])
    for t in range(frames):
        a = t / max(frames - 1, 1)
        y, x = (start * (1 - a) + end * a).astype(int)
        yield np.clip(np.rint(big[y : y + height, x : x + width]), 0, 255).astype(np.uint8)


def write_public_pans(
    outdir: str | os.PathLike, frames: int = 48, width: int = 256, height: int = 192, progress=None
) -> list[Path]:
    """Camera pans over every colour/grey still scikit-image ships (no download), as FFV1 ``.mkv``."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name in enumerate(PUBLIC_STILLS):
        img = _public_still(name)
        path = out / f"pan_{name}.mkv"
        write_video(path, generate_pan(img, width, height, frames, seed=i), Fraction(25))
        paths.append(path)
        if progress:
            progress()
    return paths


def find_videos(dirs) -> list[Path]:
    """Video files under the given folders (recursively) or the files themselves, sorted."""
    found = []
    for d in dirs:
        p = Path(d)
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(q for q in p.rglob("*") if q.suffix.lower() in VIDEO_SUFFIXES and q.is_file()))
        else:
            raise FedlvcError(f"video folder not found: {p}")
    if not found:
        raise FedlvcError(f"no video files found in {', '.join(str(d) for d in dirs)}")
    return found


def load_frames(paths, every: int = 1, max_frames_per_video: int | None = None) -> list[np.ndarray]:
    """Frames of the given videos (every ``every``-th frame, at most ``max_frames_per_video`` each)."""
    frames = []
    for path in paths:
        n = 0
        for i, f in enumerate(iter_frames(path)):
            if i % every:
                continue
            frames.append(f)
            n += 1
            if max_frames_per_video and n >= max_frames_per_video:
                break
    return frames


def load_clips(paths, every: int = 1, max_frames_per_video: int | None = None) -> list[list[np.ndarray]]:
    """Like :func:`load_frames` but one list of frames per video (consecutive frames stay together)."""
    return [load_frames([p], every, max_frames_per_video) for p in paths]


def make_segments(clips, length: int) -> list[list[np.ndarray]]:
    """Non-overlapping runs of ``length`` consecutive frames within each clip (a clip's tail shorter than
    ``length`` is dropped). Segments never span two clips."""
    if length < 2:
        raise FedlvcError("segment-frames must be at least 2")
    return [list(c[i : i + length]) for c in clips for i in range(0, len(c) - length + 1, length)]


def _reservoir(items, limit: int, seed: int) -> list:
    """At most ``limit`` of ``items`` drawn uniformly in one pass (reservoir sampling: memory bounded by
    ``limit`` items however many there are), in their original order."""
    rng = np.random.default_rng(seed)
    kept: list[tuple[int, object]] = []
    for seen, item in enumerate(items):
        if len(kept) < limit:
            kept.append((seen, item))
        else:
            j = int(rng.integers(0, seen + 1))
            if j < limit:
                kept[j] = (seen, item)
    return [item for _, item in sorted(kept, key=lambda t: t[0])]


def _runs(paths, length: int):
    """Non-overlapping runs of ``length`` consecutive frames of each video, streamed."""
    for path in paths:
        run: list[np.ndarray] = []
        for f in iter_frames(path):
            run.append(f)
            if len(run) == length:
                yield run
                run = []


def sample_segments(paths, limit: int, length: int, seed: int = 0) -> list[list[np.ndarray]]:
    """At most ``limit`` segments (non-overlapping runs of ``length`` consecutive frames of one video) drawn
    uniformly from all of them in one streaming pass (reservoir sampling), in their original order."""
    return _reservoir(_runs(paths, length), limit, seed)


def sample_frames(paths, limit: int, seed: int = 0) -> list[np.ndarray]:
    """At most ``limit`` frames drawn uniformly from all frames of the given videos (reservoir sampling:
    one pass, memory bounded by ``limit`` frames whatever the amount of video), in their original order."""
    return _reservoir((f for path in paths for f in iter_frames(path)), limit, seed)


def _random_crop_box(rng: np.random.Generator, h: int, w: int, c: int) -> tuple[int, int, bool]:
    y, x = int(rng.integers(0, max(h - c, 0) + 1)), int(rng.integers(0, max(w - c, 0) + 1))
    return y, x, bool(rng.random() < 0.5)


def _crop(f: np.ndarray, c: int, y: int, x: int, flip: bool) -> torch.Tensor:
    h, w = f.shape[:2]
    if h < c or w < c:
        f = np.pad(f, ((0, max(0, c - h)), (0, max(0, c - w)), (0, 0)), mode="reflect")
    crop = f[y : y + c, x : x + c]
    if flip:
        crop = crop[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float() / 255.0


class _CropRows(Dataset):
    """Map-style dataset whose row ``i`` is one privacy unit; each access takes a fresh random crop (and flip)
    and a random quality level, drawn from one generator seeded by ``seed`` (the crops are reproducible)."""

    def __init__(self, rows: list, crop: int, num_levels: int, seed: int = 0):
        self.rows, self.crop, self.num_levels = rows, crop, num_levels
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.rows)

    def _level(self) -> torch.Tensor:
        return torch.tensor(int(self.rng.integers(0, self.num_levels)), dtype=torch.long)


class SegmentCrops(_CropRows):
    """Row ``i`` is segment ``i`` (``S`` consecutive frames); each access crops every frame of the segment at
    the same place, so one row is one privacy unit (a segment) whatever the crop.

    Returns (crops float32 (S, 3, c, c) in [0, 1], level int64)."""

    def __getitem__(self, i: int):
        seg = self.rows[i]
        h, w = seg[0].shape[:2]
        y, x, flip = _random_crop_box(self.rng, h, w, self.crop)
        return torch.stack([_crop(f, self.crop, y, x, flip) for f in seg]), self._level()


class FrameCrops(_CropRows):
    """Row ``i`` is frame ``i``, so one row is one privacy unit (a frame) whatever the crop.

    Returns (crop float32 (3, c, c) in [0, 1], level int64)."""

    def __getitem__(self, i: int):
        f = self.rows[i]
        y, x, flip = _random_crop_box(self.rng, f.shape[0], f.shape[1], self.crop)
        return _crop(f, self.crop, y, x, flip), self._level()
