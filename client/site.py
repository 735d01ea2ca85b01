"""A site's private data: its name, its frames and where its outputs go. Frames, file names and gradients
never leave this module's process; only model weights and scalar metrics are returned to Flower."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from common.config.fedconfig import RunConfig
from common.data.clips import (
    find_videos,
    generate_site_clip,
    make_segments,
    sample_frames,
    sample_segments,
    split_held_out,
)
from common.data.sites import simulated_site
from common.data.video import probe
from common.errors import FedlvcError

from .ledger import state_dir_of
from .policy import SitePolicy

_CACHE: dict = {}


@dataclass
class SiteData:
    name: str
    site_id: int
    train_rows: list  # one row = one privacy unit: a frame (H, W, 3) uint8, or a segment (list of S frames)
    held_out: list  # consecutive frames never trained on, for evaluation
    videos: list = field(default_factory=list)  # paths (deployment) or None (generated)
    generated: bool = False


def site_identity(node_config, node_id: int = 0) -> tuple[str, int]:
    """The site's name (what it reports to the server) and number (the seed of its generated scenes and of
    its training crops): ``site-name``, else its ``video-dir``'s folder name, else ``site_<partition-id>``,
    else ``node_<Flower node id>`` — two sites without any of these keys still differ. The server keys
    sites by Flower's node id, whatever they report."""
    pid = node_config.get("partition-id", node_config.get("site-id"))
    try:
        number = int(pid) if pid is not None else int(node_id) % 1_000_003
    except (TypeError, ValueError):
        raise FedlvcError(f"node-config partition-id must be an integer, not {pid!r}") from None
    name = str(node_config.get("site-name", "") or "")
    if not name and node_config.get("video-dir"):
        name = Path(str(node_config["video-dir"])).name
    return name or (f"site_{number}" if pid is not None else f"node_{node_id}"), number


SIMULATED_OUT = Path("runs") / "sites"  # a simulated site without out-dir/state-dir: relative to its own cwd


def site_out_dir(node_config, name: str) -> Path:
    """Where the site writes its compressed video: its node ``out-dir``, else ``<state-dir>/out``, else
    (a simulated site only) ``runs/sites/<name>`` under its working folder — never a path from the run."""
    if node_config.get("out-dir"):
        return Path(str(node_config["out-dir"])).expanduser()
    state_dir = state_dir_of(node_config)
    if state_dir is not None:
        return state_dir / "out"
    if node_config.get("video-dir"):
        raise FedlvcError("this site has no out-dir or state-dir in its node config to write its compressed video to")
    return SIMULATED_OUT / name


def _frame_bytes(rc: RunConfig, videos: list) -> float:
    """What holding the site's rows costs, before any is decoded: frames × width × height × 3 bytes."""
    if not videos and rc.streamed_sites:  # streamed: a few clips' scenes, never the frames
        return 8 * 4 * (2 * max(rc.demo_width, rc.demo_height)) ** 2 * 3.0
    if not videos:
        return rc.demo_clips * rc.demo_frames * rc.demo_width * rc.demo_height * 3.0
    from common.data.video import probe

    info = probe(videos[0])
    return rc.site_max_frames * info.width * info.height * 3.0


def load_site(node_config, rc: RunConfig, policy: SitePolicy, node_id: int = 0) -> SiteData:
    """Frames of this site: its ``video-dir`` when set, else distinct clips generated from its partition id.
    The last ``eval-frames`` frames of the site are held out from training. Refused before decoding when
    the rows would pass the site's memory limit (``max-memory-mb``)."""
    name, pid = site_identity(node_config, node_id)
    video_dir = str(node_config.get("video-dir", "") or "")
    key = (
        video_dir,
        pid,
        rc.demo_frames,
        rc.demo_clips,
        rc.site_frames,
        rc.demo_photos,
        rc.demo_width,
        rc.demo_height,
        rc.demo_site_offset,
        rc.eval_frames,
        rc.site_max_frames,
        rc.unit_frames,
    )
    if key in _CACHE:
        return _CACHE[key]
    if video_dir and not Path(video_dir).is_dir():
        raise FedlvcError(f"node-config video-dir does not exist: {video_dir}")
    videos = find_videos([video_dir]) if video_dir else []
    policy.check_memory("holding the site's frames", _frame_bytes(rc, videos))
    s = rc.unit_frames
    if video_dir:
        generated = False
        if s == 1:
            rows = sample_frames(videos, rc.site_max_frames, seed=pid)
        else:
            rows = sample_segments(videos, max(1, rc.site_max_frames // s), s, seed=pid)
    elif rc.streamed_sites:
        generated = True
        rows = simulated_site(pid + rc.demo_site_offset, rc, s)
    else:
        generated = True
        clips = [
            list(generate_site_clip(pid + rc.demo_site_offset, c, rc.demo_width, rc.demo_height, rc.demo_frames))
            for c in range(rc.demo_clips)
        ]
        rows = [f for c in clips for f in c] if s == 1 else make_segments(clips, s)
    if s == 1:
        train, held_out = split_held_out(rows, rc.eval_frames)
    else:  # hold out whole segments at the end: at least eval-frames consecutive frames
        train, tail = split_held_out(rows, -(-rc.eval_frames // s))
        held_out = [f for seg in tail for f in seg][: max(rc.eval_frames, 1)]
    if not train:
        raise FedlvcError(f"site {name} has no {'frames' if s == 1 else f'segments of {s} frames'} to train on")
    data = SiteData(name, pid, train, held_out, videos, generated)
    _CACHE[key] = data
    return data


def clip_frame_sizes(node_config, rc: RunConfig) -> list[tuple[int, int]]:
    """(height, width) of the frames of the site's clips for the final compression, from the containers'
    headers (real video) or the run config (simulated), without decoding a frame."""
    video_dir = str(node_config.get("video-dir", "") or "")
    if video_dir:
        return [(info.height, info.width) for info in map(probe, find_videos([video_dir]))]
    return [(rc.demo_height, rc.demo_width)]


def site_clips(node_config, rc: RunConfig, node_id: int = 0):
    """The site's own videos for the final compression: (name, a function giving a fresh frame iterator,
    fps) per clip, so that a clip can be streamed twice (encode, then compare) without holding it."""
    from fractions import Fraction

    from common.data.video import iter_frames, probe

    _, pid = site_identity(node_config, node_id)
    video_dir = str(node_config.get("video-dir", "") or "")
    if video_dir:
        for path in find_videos([video_dir]):
            yield path.stem, (lambda p=path: iter_frames(p)), probe(path).fps
    elif rc.streamed_sites:  # a streamed site compresses its first demo-clips clips
        site = simulated_site(pid + rc.demo_site_offset, rc)
        for c in range(min(rc.demo_clips, site.clips)):
            yield f"clip_{c}", (lambda c=c: site.clip(c)), Fraction(25)
    else:
        for c in range(rc.demo_clips):
            yield (
                f"clip_{c}",
                (
                    lambda c=c: generate_site_clip(
                        pid + rc.demo_site_offset, c, rc.demo_width, rc.demo_height, rc.demo_frames
                    )
                ),
                Fraction(25),
            )
