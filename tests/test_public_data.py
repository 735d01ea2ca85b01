"""The public photo corpus (common.data.corpus: selection, conversion, manifest, the GCompris bundles) and the
training video made from it (common.data.photovideo). The download itself needs the network and is not run here;
everything after it is."""

from __future__ import annotations

import csv
import io
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.cli import main
from common.data.corpus import rcc_files, readme_licences, write_corpus
from common.data.photovideo import HELD_OUT_SHARE, corpus_photos, is_held_out, photo_clip
from tests.conftest import random_jpeg


def _put(root: Path, rel: str, data: bytes) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(data)


def test_the_corpus_keeps_originals_converts_the_rest_and_writes_the_manifest(tmp_path):
    roots = {p: tmp_path / "x" / p for p in ("mate-backgrounds", "libjxl-testdata", "kphotoalbum", "scikit-learn")}
    aqua = random_jpeg(64, 40, 1)
    _put(roots["mate-backgrounds"], "usr/share/backgrounds/mate/nature/Aqua.jpg", aqua)
    _put(
        roots["mate-backgrounds"],
        "usr/share/backgrounds/mate/nature/Dune.jpg",
        random_jpeg(40, 64, 2, exif_orientation=6),
    )
    rgba = Image.new("RGBA", (30, 20), (255, 0, 0, 0))
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    _put(roots["libjxl-testdata"], "usr/share/libjxl-testdata/jxl/flower/flower.png", buf.getvalue())
    _put(roots["kphotoalbum"], "usr/share/kphotoalbum/demo/a.jpg", random_jpeg(48, 32, 3))
    _put(roots["kphotoalbum"], "usr/share/kphotoalbum/demo/index.xml",
         b'<images><image file="a.jpg" angle="90" /></images>')  # fmt: skip
    _put(roots["scikit-learn"], "sklearn/datasets/images/china.jpg", random_jpeg(32, 32, 4))
    versions = {p: f"1.{i}" for i, p in enumerate(roots)}
    rows = write_corpus(roots, versions, tmp_path / "photos")
    with open(tmp_path / "photos" / "MANIFEST.tsv", newline="") as f:
        manifest = {r["file"]: r for r in csv.DictReader(f, delimiter="\t")}
    assert len(rows) == len(manifest) == 5  # every other curated file is missing here, and skipped
    a = manifest["mate-backgrounds__Aqua.jpg"]
    assert (a["source_package"], a["version"], a["licence"], a["width"], a["height"]) == (
        "mate-backgrounds", "1.0", "GPL-2+", "64", "40")  # fmt: skip
    assert (tmp_path / "photos" / "mate-backgrounds__Aqua.jpg").read_bytes() == aqua  # the original, untouched
    dune = manifest["mate-backgrounds__Dune.png"]  # EXIF-rotated: decoded upright, lossless
    assert (dune["width"], dune["height"]) == ("64", "40")
    flower = manifest["libjxl-testdata__flower.png"]
    assert Image.open(tmp_path / "photos" / flower["file"]).mode == "RGB"  # transparency flattened on grey
    album = manifest["kphotoalbum__a.png"]  # the album's own rotation applied
    assert (album["width"], album["height"], album["src_format"]) == ("32", "48", "JPEG+rot90")
    assert manifest["scikit-learn__china.jpg"]["licence"] == "CC-BY-2.0"
    with pytest.raises(Exception, match="not empty|exist"):
        from common.data.corpus import fetch_corpus

        fetch_corpus(tmp_path / "photos")  # refuses a folder that already holds something, before downloading


def _rcc(files: dict[str, bytes], compress: set[str]) -> bytes:
    """A version-1 Qt resource bundle holding ``files`` in one folder ``res``."""
    names = b""
    offsets = {}
    for n in ["res", *files]:
        offsets[n] = len(names)
        encoded = n.encode("utf-16-be")
        names += struct.pack(">HI", len(n), 0) + encoded
    data, data_offsets = b"", {}
    for n, blob in files.items():
        body = struct.pack(">I", len(blob)) + zlib.compress(blob) if n in compress else blob
        data_offsets[n] = len(data)
        data += struct.pack(">I", len(body)) + body
    tree = struct.pack(">IHII", 0, 2, 1, 1)  # root: a folder with one child, node 1
    tree += struct.pack(">IHII", offsets["res"], 2, len(files), 2)  # res/: the files, nodes 2..
    for n in files:
        tree += struct.pack(">IHHHI", offsets[n], 1 if n in compress else 0, 0, 0, data_offsets[n])
    header = 20
    return b"qres" + struct.pack(">IIII", 1, header, header + len(tree), header + len(tree) + len(data)) + tree + (
        data + names)  # fmt: skip


def test_gcompris_bundles_and_licence_notes_are_read():
    files = {"a.webp": b"\x01\x02" * 50, "README": b"files: a.webp\n b.jpg\nlicense: CC-BY-SA 4.0\n\nfiles: c.png\n"}
    got = rcc_files(_rcc(files, compress={"a.webp"}))
    assert got == {"/res/a.webp": files["a.webp"], "/res/README": files["README"]}
    assert readme_licences(files["README"].decode()) == {
        "a.webp": "CC-BY-SA-4.0",
        "b.jpg": "CC-BY-SA-4.0",
        "c.png": "?",
    }


def test_photo_clips_are_deterministic_and_the_held_out_photos_never_used(corpus):
    train, held = corpus_photos(corpus), corpus_photos(corpus, held_out=True)
    assert set(train).isdisjoint(held) and len(train) + len(held) == 24
    assert all(is_held_out(p.name) for p in held) and held  # about one in HELD_OUT_SHARE
    assert len(held) < 24 / HELD_OUT_SHARE * 3
    a, b = photo_clip(train, 3, 64, 48, 6), photo_clip(train, 3, 64, 48, 6)
    assert a.shape == (6, 48, 64, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, photo_clip(train, 4, 64, 48, 6))


def test_cli_writes_clips_over_a_photo_corpus(corpus, tmp_path, capsys):
    out = tmp_path / "public"
    args = ["public-data", str(out), "--photos", str(corpus), "--clips", "2", "--frames", "4", "--width", "64"]
    assert main([*args, "--height", "48", "--quiet"]) == 0
    from common.data.video import read_frames

    clips = sorted((out / "clips").glob("*.mkv"))
    assert [c.name for c in clips] == ["photo_0000.mkv", "photo_0001.mkv"]
    assert read_frames(clips[0]).shape == (4, 48, 64, 3)
    assert main(["public-data", str(tmp_path / "none"), "--photos", str(tmp_path / "missing")]) == 2
    assert "no photo corpus" in capsys.readouterr().err


def test_the_camera_view_stays_inside_the_photograph():
    """A zoom-out past the photograph's edge once gave a negative crop box (PIL refused it mid-run)."""
    from common.data.photovideo import _camera

    outside = 0
    for seed in range(200):
        rng = np.random.default_rng(seed)
        top, left, view_w, view_h = _camera(rng, 24, 300, 400, 256, 192)
        outside += int((top < 0).any() or (left < 0).any())
        assert (top + view_h <= 300 + 1e-6).all() and (left + view_w <= 400 + 1e-6).all()
    assert outside == 0


def test_the_private_apt_configuration_names_absolute_folders(tmp_path, monkeypatch):
    """apt reads a relative Dir:: path under /etc/apt/: `fedlvc public-data data/public --fetch` from a project
    folder failed so ("Unable to read /etc/apt/data/public/..."). No network here: apt is not run."""
    from common.data import corpus

    calls = []
    monkeypatch.setattr(corpus, "_run", lambda cmd, **kw: calls.append((cmd, kw)))
    monkeypatch.setattr(corpus, "debian_mirror", lambda: "http://deb.example.org/debian")
    monkeypatch.setattr(corpus, "DEBIAN", {})
    monkeypatch.chdir(tmp_path)
    assert corpus.fetch_debian(Path("data") / ".photos.download") == {}
    conf = Path(calls[0][1]["env"]["APT_CONFIG"])
    assert conf.is_absolute() and conf.is_file()
    paths = re.findall(r'^Dir::[\w:]+ "([^"]+)";$', conf.read_text(), re.M)
    assert len(paths) == 5 and all(Path(p).is_absolute() for p in paths)
    assert Path(paths[0]).read_text().startswith("deb http://deb.example.org/debian bookworm main")
