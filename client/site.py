"""A site's private data and privacy ledger. Frames, file names and gradients never leave this module's
process; only model weights and scalar metrics are returned to Flower."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from common.data import (find_videos, generate_site_clip, make_segments, sample_frames, sample_segments,
                         split_held_out)
from common.errors import FedlvcError
from common.fedconfig import RunConfig
from common.privacy import check_privacy_unit, epsilon_from_history
from common.video import atomic_output

_CACHE: dict = {}


@dataclass
class SiteData:
    name: str
    site_id: int
    train_rows: list  # one row = one privacy unit: a frame (H, W, 3) uint8, or a segment (list of S frames)
    held_out: list  # consecutive frames never trained on, for evaluation
    videos: list = field(default_factory=list)  # paths (deployment) or None (generated)
    generated: bool = False


def site_identity(node_config) -> tuple[str, int]:
    """A stable site name and number: ``site-name``/``partition-id`` from the node config."""
    pid = int(node_config.get("partition-id", node_config.get("site-id", 0)))
    name = str(node_config.get("site-name", "")) or (
        Path(str(node_config["video-dir"])).name if node_config.get("video-dir") else f"site_{pid}"
    )
    return name, pid


def load_site(node_config, rc: RunConfig) -> SiteData:
    """Frames of this site: its ``video-dir`` when set, else distinct clips generated from its partition id.
    The last ``eval-frames`` frames of the site are held out from training."""
    name, pid = site_identity(node_config)
    video_dir = str(node_config.get("video-dir", "") or "")
    key = (video_dir, pid, rc.demo_frames, rc.demo_clips, rc.demo_width, rc.demo_height, rc.demo_site_offset,
           rc.eval_frames, rc.site_max_frames, rc.unit_frames)
    if key in _CACHE:
        return _CACHE[key]
    s = rc.unit_frames
    if video_dir:
        if not Path(video_dir).is_dir():
            raise FedlvcError(f"node-config video-dir does not exist: {video_dir}")
        videos = find_videos([video_dir])
        generated = False
        if s == 1:
            rows = sample_frames(videos, rc.site_max_frames, seed=pid)
        else:
            rows = sample_segments(videos, max(1, rc.site_max_frames // s), s, seed=pid)
    else:
        videos = []
        generated = True
        clips = [list(generate_site_clip(pid + rc.demo_site_offset, c, rc.demo_width, rc.demo_height, rc.demo_frames))
                 for c in range(rc.demo_clips)]
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


def site_clips(node_config, rc: RunConfig):
    """The site's own videos for the final compression: (name, a function giving a fresh frame iterator,
    fps) per clip, so that a clip can be streamed twice (encode, then compare) without holding it."""
    from fractions import Fraction

    from common.video import iter_frames, probe

    _, pid = site_identity(node_config)
    video_dir = str(node_config.get("video-dir", "") or "")
    if video_dir:
        for path in find_videos([video_dir]):
            yield path.stem, (lambda p=path: iter_frames(p)), probe(path).fps
    else:
        for c in range(rc.demo_clips):
            yield (f"clip_{c}", (lambda c=c: generate_site_clip(pid + rc.demo_site_offset, c, rc.demo_width,
                                                                rc.demo_height, rc.demo_frames)),
                   Fraction(25))


def _history_rows(rows) -> list[tuple[float, float, int]]:
    """An accountant history ``[(σ, q, steps), ...]`` from its JSON form (ValueError/TypeError if malformed)."""
    return [(float(s), float(q), int(n)) for s, q, n in rows]


def earlier_ledger(config, site_id: int) -> dict | None:
    """This site's record ``{"unit_frames", "history"}`` in the ``earlier-ledgers`` the server sends with
    a training round of a run continued from ``resume-from`` (None when it has none)."""
    try:
        mine = json.loads(str(config.get("earlier-ledgers", "{}"))).get(f"site_{site_id}")
        if mine is None:
            return None
        return {"unit_frames": int(mine.get("unit_frames", 1)), "history": _history_rows(mine["history"])}
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise FedlvcError(f"the server's earlier-ledgers record is malformed: {e}") from None


class PrivacyLedger:
    """The site's DP accountant history ``[(σ, q, steps), ...]``: kept in Flower's ``Context.state`` during a
    run and, when the node config has ``state-dir``, on disk so that ε keeps adding up across SuperNode
    restarts and across runs on the same data."""

    FILE = "privacy_ledger.json"

    def __init__(self, history, accountant: str, delta: float, path: Path | None, unit_frames: int = 1):
        self.history = [tuple(h) for h in history]
        self.accountant, self.delta, self.path, self.unit_frames = accountant, delta, path, unit_frames

    @classmethod
    def load(cls, context, rc: RunConfig, earlier: dict | None = None) -> "PrivacyLedger":
        """The ledger on disk (``state-dir``), else this run's ``Context.state``, else ``earlier``: this site's
        rounds before a ``resume-from``, as the server's ``history.json`` recorded them. Without the last, a
        site with no ledger on disk (every simulated site) would start again from ε = 0 in a resumed run."""
        state_dir = str(context.node_config.get("state-dir", "") or "")
        path = Path(state_dir) / cls.FILE if state_dir else None
        history = []
        if path is not None and path.is_file():
            try:
                doc = json.loads(path.read_text())
                history = _history_rows(doc["history"])
            except (ValueError, KeyError, TypeError) as e:
                raise FedlvcError(f"privacy ledger {path} is unreadable: {e}") from None
            if doc.get("accountant", rc.accountant) != rc.accountant:
                raise FedlvcError(f"privacy ledger {path} was kept with the {doc['accountant']} accountant, "
                                  f"run-config asks for {rc.accountant}")
            if history:
                check_privacy_unit(int(doc.get("unit_frames", 1)), rc.unit_frames, f"privacy ledger {path}",
                                   "use another state-dir or the same unit")
        elif "privacy" in context.state:
            rec = context.state["privacy"]
            history = list(zip(rec["sigma"], rec["q"], rec["steps"]))
        elif earlier and earlier["history"]:
            check_privacy_unit(earlier["unit_frames"], rc.unit_frames, "the rounds before resume-from",
                               "resume with the same unit")
            history = earlier["history"]
        return cls(history, rc.accountant, rc.delta, path, rc.unit_frames)

    def epsilon(self, extra=()) -> float:
        return epsilon_from_history(self.history + list(extra), self.delta, self.accountant)

    def save(self, context) -> None:
        from flwr.app import ConfigRecord

        if self.history:
            context.state["privacy"] = ConfigRecord({
                "sigma": [float(s) for s, _, _ in self.history],
                "q": [float(q) for _, q, _ in self.history],
                "steps": [int(n) for _, _, n in self.history],
            })
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_output(self.path) as tmp:
                Path(tmp).write_text(json.dumps({"accountant": self.accountant, "delta": self.delta,
                                                 "unit_frames": self.unit_frames,
                                                 "history": [list(h) for h in self.history]}, indent=1))

    def flat(self) -> dict:
        """The history as three parallel lists (Flower metric records hold lists of numbers)."""
        return {"dp_sigma": [float(s) for s, _, _ in self.history],
                "dp_sample_rate": [float(q) for _, q, _ in self.history],
                "dp_steps": [int(n) for _, _, n in self.history]}

