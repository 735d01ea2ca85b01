"""Where a codec run spends its time, by stage: a sampling profiler (not a benchmark itself).

A thread samples the profiled thread's Python stack every ``interval`` seconds; each sample goes to the stage of
the innermost frame on the stack that is a stage's root (a function of fedlvc named in :data:`STAGES`), so a
context computation inside the entropy coder counts as contexts, and a convolution called from the synthesis
transform as synthesis. Samples under no root are "other" (Python glue between the stages, and whatever the
table does not name). Native code (torch kernels, FFmpeg, the ANS coder) has no Python frame of its own: it
counts for the Python function that called it. The shares are exact up to sampling noise (±1/√samples); the
seconds are the shares of the measured wall time.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from pathlib import Path

# stage: {module file stem: function names (None: every function of the module)}
STAGES = {
    "video decode + colour conversion": {"video": {"iter_frames", "read_frames", "_open_input", "probe"}},
    "video write": {"video": {"write", "close", "__exit__", "write_video"}},
    "analysis (g_a, h_a)": {"codec": {"analysis"}, "model": {"analysis"}, "hypercoder": {"hyper_latent"}},
    "P-frame choice (RDO, motion search)": {
        "codec": {"choose"},
        "pframe": {"choose"},
        "rdo": {"choose_p_latent", "synthesis_sensitivity"},
        "residual": {"residual_sensitivity", "trial", "_trial"},
        "motion": {"estimate"},
    },
    "contexts, parameters and tables": {
        "temporal": {  # the P-frame contexts (the module's Laplace pieces count for their caller's stage)
            "__init__",
            "of",
            "add",
            "p_context",
            "temporal_context",
            "history_value",
            "in_frame_value",
            "channel_groups",
            "residual_context",
            "next_history",
        },
        "pframe": {"params", "fit", "scale_table"},
        "hypercoder": {"_element_tables", "fit", "_groups", "_gauss_model", "_z_models", "integer_layers"},
        "entropy": {"pmf", "_categoricals", "fit", "_symbols"},
        "motion": {"motion_class", "vector_differences", "vectors_from_differences", "median_predictor"},
    },
    "ANS coding": {
        "entropy": {"pack", "unpack", "compress", "decompress"},
        "pframe": {"compress", "decompress"},
        "hypercoder": {"compress", "decompress"},
    },
    "synthesis (g_s) and prediction": {
        "model": {"synthesis"},
        "codec": {"intra_frame", "reconstruct", "_to_frame"},
        "residual": {"_decoded"},
        "motion": {"predict"},
    },
    "bitstream, checksums": {"bitstream": None},
}


def _root_table() -> dict:
    table = {}
    for stage, modules in STAGES.items():
        for stem, names in modules.items():
            table.setdefault(stem, []).append((stage, names))
    return table


class StageSampler:
    """``with StageSampler() as s: work()`` then ``s.result()``: {stage: {"seconds", "share"}} of ``work``."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.counts, self._table = interval, Counter(), _root_table()
        self._target = threading.get_ident()
        self._stop = threading.Event()

    def _stage(self, frame) -> str:
        while frame is not None:
            code = frame.f_code
            for stage, names in self._table.get(Path(code.co_filename).stem, ()):
                if names is None or code.co_name in names:
                    return stage
            frame = frame.f_back
        return "other (Python glue)"

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            frame = sys._current_frames().get(self._target)
            if frame is not None:
                self.counts[self._stage(frame)] += 1

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._started
        self._stop.set()
        self._thread.join()
        return False

    def result(self) -> dict:
        total = sum(self.counts.values()) or 1
        order = [*STAGES, "other (Python glue)"]
        return {
            "wall_seconds": self.seconds,
            "samples": total,
            "stages": {
                s: {"seconds": self.seconds * self.counts[s] / total, "share": self.counts[s] / total}
                for s in order
                if self.counts[s]
            },
        }
