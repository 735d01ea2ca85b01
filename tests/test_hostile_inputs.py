"""Hostile inputs other than bitstreams: a video that fails part-way leaves no output at all."""

from __future__ import annotations

import hashlib
import os
from fractions import Fraction

from client.cli import main as cli
from common.data.clips import generate_site_clip
from common.data.video import write_video


def test_a_video_that_fails_mid_stream_leaves_no_partial_output(tmp_path, capsys):
    good = tmp_path / "in.mkv"
    write_video(good, generate_site_clip(0, 0, 64, 48, 30), Fraction(25))
    data = bytearray(good.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 2000] = bytes(b ^ 0x5A for b in data[middle : middle + 2000])  # damage in the middle
    bad = tmp_path / "bad.mkv"
    bad.write_bytes(bytes(data))
    digest = hashlib.sha256(bad.read_bytes()).hexdigest()
    out = tmp_path / "out"
    out.mkdir()
    assert cli(["compress", str(bad), str(out / "x.lvc"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "failed after" in err[0] and "frames" in err[0]
    assert os.listdir(out) == []  # neither the output nor a temporary file
    assert hashlib.sha256(bad.read_bytes()).hexdigest() == digest
