#!/usr/bin/env python
"""How often ``fedlvc compress`` returns to a module it had left, following its call path from the CLI to bytes.

Runs ``fedlvc compress`` in-process (``client.cli.main``) on a short generated clip under ``sys.setprofile``
(Python calls only) and reads its call path:

* a *step* is a call of a function defined in a fedlvc module (a file under ``common/`` or ``client/``), from
  ``cmd_compress(args)`` down. Not steps, their calls being their caller's: the code between two fedlvc
  functions (torch's ``Module.__call__``, numpy, argparse), property getters (read as attributes: ``cfg.hyper``),
  comprehensions, generator expressions and lambdas (read in place), and code run while importing a module;
* calls made in the same calling context (the same chain of fedlvc functions from ``cmd_compress``) are one
  step: the calling-context tree, so a loop over frames, channels or channel groups counts once, and a clip of
  three frames (an I-frame, a P-frame, a P-frame with the group's motion history) walks every branch a longer
  one does;
* the *path* is that tree read depth first, each function's calls in the order they were first made, and each
  function read once: a function met again (a second ``check_gop``) is not a step again, while what it calls
  for the first time there is. Its *modules* are the sequence of the modules of its steps, a module's
  consecutive steps one *visit*;
* a *return* is a visit to a module the path had visited before: ``returns`` = visits − modules.

So ``cli → codec → options → codec`` is one return (to codec), and a function that calls a helper of its own
module after a call into another module returns to its module. Issue 35 counted 32 returns over 14 modules,
codec.py visited 11 times, for the shipped model; on the code of that time this rule gives 35 over 14 modules,
codec.py visited 12 times (v3, 3 frames). Prints one JSON line: per branch (the
shipped model v3 with its default group of pictures on a 1-frame and a 3-frame clip, v4 and the motion model on
3 frames) the returns, the modules, the visits per module; ``--path`` prints each branch's steps on stderr.

    python benchmarks/call_path.py [--frames 3] [--size 64x48] [--path] [--threads N]
"""

from __future__ import annotations

import argparse
import functools
import inspect
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

import _common as C

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = tuple(str(ROOT / p) + "/" for p in ("common", "client"))
MODELS = {
    "v3": "common/pretrained/fedlvc-default.safetensors",
    "v4": "common/pretrained/v4/fedlvc-v4-wip.safetensors",
    "motion": "common/pretrained/motion/fedlvc-motion-wip.safetensors",
}


class _Node:
    __slots__ = ("module", "name", "children")

    def __init__(self, module: str, name: str):
        self.module, self.name, self.children = module, name, {}


def _ours(code) -> bool:
    return code.co_filename.startswith(PACKAGES)


_IN_PLACE: dict = {}  # code object → whether its calls are its caller's (a property getter, a comprehension)


def _in_place(frame) -> bool:
    code = frame.f_code
    if code not in _IN_PLACE:
        owner, _, name = code.co_qualname.rpartition(".")
        cls = frame.f_globals.get(owner) if owner and "<" not in owner else None
        attr = inspect.getattr_static(cls, name, None) if cls is not None else None
        _IN_PLACE[code] = code.co_name in IN_PLACE_NAMES or isinstance(attr, (property, functools.cached_property))
    return _IN_PLACE[code]


IN_PLACE_NAMES = {"<lambda>", "<genexpr>", "<listcomp>", "<setcomp>", "<dictcomp>"}


class CallTree:
    """The calling-context tree of the fedlvc functions called under ``cmd_compress`` (a profile function)."""

    def __init__(self):
        self.root: _Node | None = None
        self._active: dict[int, _Node | None] = {}  # frame id → its node (None: import-time code)

    def _parent(self, frame):
        f = frame.f_back
        while f is not None and id(f) not in self._active:
            f = f.f_back
        return None if f is None else self._active[id(f)]

    def __call__(self, frame, event, arg) -> None:
        code = frame.f_code
        if event == "return" and id(frame) in self._active:
            del self._active[id(frame)]
        if event != "call" or not _ours(code) or _in_place(frame):
            return
        parent = self._parent(frame)
        if code.co_name == "<module>" or (parent is None and self.root is not None):
            self._active[id(frame)] = None  # importing a module, or outside the path: not steps
            return
        if parent is None and code.co_name != "cmd_compress":
            return
        key = (code.co_filename, code.co_firstlineno, code.co_name)
        module = str(Path(code.co_filename).relative_to(ROOT))
        if parent is None:
            self.root = node = _Node(module, code.co_qualname)
        else:
            node = parent.children.get(key)
            if node is None:
                node = parent.children[key] = _Node(module, code.co_qualname)
        self._active[id(frame)] = node

    def steps(self) -> list[tuple[str, str, int]]:
        """(module, function, depth) of every step, depth first, each function once."""
        out, seen, stack = [], set(), [(self.root, 0)]
        while stack:
            node, depth = stack.pop()
            if (node.module, node.name) not in seen:
                seen.add((node.module, node.name))
                out.append((node.module, node.name, depth))
            stack.extend((c, depth + 1) for c in reversed(list(node.children.values())))
        return out


def count_returns(modules: list[str]) -> dict:
    """Visits (stretches of consecutive steps in one module) per module and the returns of a path."""
    visits: dict[str, int] = {}
    for i, m in enumerate(modules):
        if i == 0 or modules[i - 1] != m:
            visits[m] = visits.get(m, 0) + 1
    return {
        "returns": sum(visits.values()) - len(visits),
        "modules": len(visits),
        "steps": len(modules),
        "visits": dict(sorted(visits.items(), key=lambda kv: -kv[1])),
    }


def trace_compress(clip: Path, model: Path, out: Path) -> list[tuple[str, str, int]]:
    from client.cli import main

    tree = CallTree()
    sys.setprofile(tree)
    try:
        code = main(["compress", str(clip), str(out), "--model", str(model), "--quiet"])
    finally:
        sys.setprofile(None)
    if code != 0:
        raise SystemExit(f"fedlvc compress failed ({code})")
    return tree.steps()


def _clip(folder: Path, frames: int, width: int, height: int) -> Path:
    from common.data.clips import generate_site_clip
    from common.data.video import write_video

    path = folder / f"static-{frames}.mkv"  # site 4: a fixed camera (a motion model tries both P-frame kinds)
    write_video(path, list(generate_site_clip(4, 0, width, height, frames)), Fraction(25))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=3, help="frames of the clip (default 3: I, P, P)")
    ap.add_argument("--size", default="64x48", help="WxH of the generated clip")
    ap.add_argument("--path", action="store_true", help="print each branch's steps on stderr")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    C.set_threads(args.threads)
    width, height = map(int, args.size.split("x"))
    runs = [("v3-1frame", "v3", 1), ("v3", "v3", args.frames), ("v4", "v4", args.frames)]
    runs.append(("motion", "motion", args.frames))
    with C.json_stdout() as emit, tempfile.TemporaryDirectory() as tmp:
        import client.cli  # noqa: F401  (imported before tracing: import-time code is not the path)
        import common.codec  # noqa: F401

        branches = {}
        for name, model, frames in runs:
            steps = trace_compress(_clip(Path(tmp), frames, width, height), ROOT / MODELS[model], Path(tmp) / "o.lvc")
            if args.path:
                C.log(f"--- {name}")
                for i, (module, function, depth) in enumerate(steps):
                    mark = ">> " if i and steps[i - 1][0] != module else "   "
                    C.log(f"{'  ' * depth}{mark}{module}: {function}")
            branches[name] = {"model": MODELS[model], "frames": frames, **count_returns([s[0] for s in steps])}
        emit({"benchmark": "call_path", "clip": f"generate_site_clip(4, 0, {width}, {height}, frames)", **branches})


if __name__ == "__main__":
    main()
