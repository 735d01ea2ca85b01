"""Decoding streams: peak memory does not grow with the number of frames."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tracemalloc
import weakref
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from conftest import make_coding_model

from common.checkpoint import fingerprint, load_model
from common.codec import decode_stream, encode_frames
from common.data.clips import generate_site_clip

SIDE = 64


@pytest.fixture(scope="module")
def model():
    return make_coding_model(0)


@pytest.fixture(scope="module")
def streams(tmp_path_factory, model):
    folder = tmp_path_factory.mktemp("streams")
    paths = {}
    for n in (8, 64):
        path = folder / f"clip{n}.lvc"
        summary = encode_frames(generate_site_clip(0, 1, SIDE, SIDE, n), path, model, 6, Fraction(25))
        assert summary["frames"] == n
        paths[n] = path
    return paths


def _peak_decoding(path, model) -> tuple[int, int, int]:
    """(frames, bytes of all decoded frames, peak traced bytes while decoding)."""
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        header, frames = decode_stream(path, model)
        count, total = 0, 0
        for frame in frames:
            assert frame.shape == (SIDE, SIDE, 3)
            count += 1
            total += frame.nbytes
            del frame
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == header.frames
    return count, total, peak


def test_decoding_memory_does_not_grow_with_frames(streams, model):
    _peak_decoding(streams[8], model)  # warm up: tables, lazy imports
    n8, total8, peak8 = _peak_decoding(streams[8], model)
    n64, total64, peak64 = _peak_decoding(streams[64], model)
    assert (n8, n64) == (8, 64)
    assert total64 == 8 * total8
    slack = 0.5 * peak8 + 64 * 1024
    # Holding the 56 extra frames (or their latents) would cost far more than the allowed slack.
    assert total64 - total8 > 2 * slack
    assert peak64 < peak8 + slack, (peak8, peak64, total64)


def test_motion_decoding_memory_does_not_grow_with_frames(tmp_path, model):
    """A motion model's decoder holds the previous decoded frame, the group's residual history and counts."""
    from common.net.model import with_motion

    motion = with_motion(model)
    paths = {}
    for n in (8, 64):
        paths[n] = tmp_path / f"m{n}.lvc"
        encode_frames(generate_site_clip(0, 1, SIDE, SIDE, n), paths[n], motion, 6, Fraction(25), 32)
    _peak_decoding(paths[8], motion)
    n8, total8, peak8 = _peak_decoding(paths[8], motion)
    n64, total64, peak64 = _peak_decoding(paths[64], motion)
    slack = 0.5 * peak8 + 64 * 1024
    assert (n8, n64) == (8, 64) and total64 - total8 > 2 * slack
    assert peak64 < peak8 + slack, (peak8, peak64, total64)


def test_peak_memory_check_would_catch_accumulation(streams, model):
    """Sanity check of the measurement: keeping (numpy copies of) the frames shows up in the traced peak."""
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        _, frames = decode_stream(streams[64], model)
        kept = [np.array(f) for f in frames]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak >= sum(f.nbytes for f in kept)


# The decoded frames themselves are allocated by torch (``tensor.numpy()`` shares torch's buffer), which
# tracemalloc does not see. So also watch the resident set size while a longer clip of larger frames
# decodes: holding on to frames would add about one frame per frame decoded. This runs in a fresh Python
# process, because in a long-lived one freed memory from earlier tests would absorb the growth.

BIG_SIDE, BIG_FRAMES = 256, 64

RSS_SCRIPT = r"""
import gc, json, os, sys
import torch
torch.set_num_threads(1)
from common.checkpoint import load_model
from common.codec import decode_stream

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

model = load_model(sys.argv[1])

def run(keep):
    gc.collect()
    _, frames = decode_stream(sys.argv[2], model)
    kept, samples, nbytes = [], [], 0
    for i, frame in enumerate(frames):
        if keep:
            kept.append(frame)
        if i >= 8:
            nbytes += frame.nbytes
        samples.append(rss())
        del frame
    return {"growth": samples[-1] - samples[7], "bytes": nbytes, "frames": len(samples)}

run(False)  # warm up
print(json.dumps({"streamed": run(False), "kept": run(True)}))
"""


@pytest.fixture(scope="module")
def big_stream(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("big") / "big.lvc"
    encode_frames(generate_site_clip(1, 1, BIG_SIDE, BIG_SIDE, BIG_FRAMES), path, model, 6, Fraction(25))
    return path


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_decoding_resident_memory_does_not_grow_with_frames(big_stream, coding_model_path):
    assert fingerprint(load_model(coding_model_path)) == fingerprint(make_coding_model(0))
    proc = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(coding_model_path), str(big_stream)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    streamed, kept = result["streamed"], result["kept"]
    assert streamed["frames"] == kept["frames"] == BIG_FRAMES
    nbytes = streamed["bytes"]
    assert nbytes == 56 * BIG_SIDE * BIG_SIDE * 3
    assert streamed["growth"] < 0.3 * nbytes, result
    # The same measurement does see frames that are kept.
    assert kept["growth"] > 0.8 * nbytes, result


def test_decoder_keeps_no_reference_to_yielded_frames(streams, model):
    _, frames = decode_stream(streams[8], model)
    refs = []
    for frame in frames:
        refs.append(weakref.ref(frame))
        del frame
        assert refs[-1]() is None, "the decoder still holds a frame it has yielded"
    assert len(refs) == 8


def test_decode_stream_checks_header_before_any_frame(streams, model, tmp_path):
    data = streams[8].read_bytes()
    bad = tmp_path / "bad.lvc"
    bad.write_bytes(b"XXXX" + data[4:])
    from common.errors import FedlvcError

    with pytest.raises(FedlvcError, match="magic"):
        decode_stream(bad, model)  # raised by the call itself, not at the first next()


def test_decoded_frames_are_new_arrays(streams, model):
    _, frames = decode_stream(streams[8], model)
    got = list(frames)
    assert len({id(f) for f in got}) == 8
    assert not np.shares_memory(got[0], got[1])
