"""End to end through the `fedlvc` command line (client.cli.main): compress/decompress round trips and every
error a user can cause (exit code 2, one `fedlvc: error:` line, no output left behind, input untouched)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ODD_FRAMES, ODD_HEIGHT, ODD_WIDTH, sha256

from client.cli import main
from common.checkpoint import fingerprint, load_model
from common.codec import DEFAULT_GOP, _to_tensor, decode_stream
from common.coding import bitstream as bs
from common.data.video import probe, read_frames
from common.errors import FedlvcError
from common.eval.metrics import psnr_rgb

ERROR_PREFIX = "fedlvc: error: "


def cli(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def expect_user_error(capsys, args, *, inputs=(), folders=(), match=None) -> str:
    """Run the CLI (quietly) and check the whole contract of a user error; return the message."""
    inputs = [Path(p) for p in inputs]
    folders = [Path(f) for f in folders]
    hashes = {p: sha256(p) for p in inputs if p.is_file()}
    before = {f: listing(f) for f in folders}
    rc, out, err = cli(capsys, *args, "--quiet")
    assert rc == 2, (rc, out, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(ERROR_PREFIX), err
    assert len(lines[0]) > len(ERROR_PREFIX) + 5
    assert "Traceback" not in err and out == ""
    if match is not None:
        assert re.search(match, lines[0], re.IGNORECASE), lines[0]
    for f, names in before.items():
        after = listing(f)
        assert not [n for n in after if n.endswith(".part")], f"temporary file left in {f}: {after}"
        assert after == names, f"{f} changed: {sorted(after ^ names)}"
    for p, h in hashes.items():
        assert sha256(p) == h, f"input {p} was modified"
    return lines[0][len(ERROR_PREFIX) :]


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def lvc(tmp_path_factory, odd_clip, tiny_model_path) -> Path:
    """The odd-size clip compressed with the tiny model (quality 4). Read-only: copy before changing."""
    out = tmp_path_factory.mktemp("lvc") / "odd.lvc"
    assert main(["compress", str(odd_clip), str(out), "--model", str(tiny_model_path), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def chunks(lvc) -> list[bs.ChunkSpan]:
    """Where every frame chunk of ``lvc`` lies."""
    data = lvc.read_bytes()
    found = bs.chunk_table(data)
    assert found[-1].end == len(data) and len(found) == ODD_FRAMES
    assert all(c.length > 4 for c in found)  # symbols besides the latent checksum
    assert all(c.head == (1 if 2 * c.length + 1 < 128 else 2) for c in found)  # the shortest varint
    return found


@pytest.fixture
def dirs(tmp_path) -> tuple[Path, Path]:
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    dst.mkdir()
    return src, dst


def put(folder: Path, name: str, data: bytes) -> Path:
    p = folder / name
    p.write_bytes(data)
    return p


# ------------------------------------------------------------------------------------------- round trips


def test_compress_reports_size_and_bpp(capsys, odd_clip, tiny_model_path, dirs):
    _, dst = dirs
    out = dst / "clip.lvc"
    rc, stdout, err = cli(capsys, "compress", odd_clip, out, "--model", tiny_model_path, "--json", "--quiet")
    assert rc == 0, err
    summary = json.loads(stdout)
    size = out.stat().st_size
    assert summary["bytes"] == size
    assert summary["frames"] == ODD_FRAMES
    assert (summary["width"], summary["height"]) == (ODD_WIDTH, ODD_HEIGHT)
    assert summary["quality"] == 4
    assert summary["bpp"] == pytest.approx(size * 8 / (ODD_FRAMES * ODD_WIDTH * ODD_HEIGHT), rel=1e-12)
    assert 0 < summary["ideal_bpp"] <= summary["bpp"]
    assert listing(dst) == {"clip.lvc"}
    # The header says what the summary says.
    with open(out, "rb") as f:
        h = bs.read_header(f, size)
    assert (h.width, h.height, h.frames, h.quality, h.gop) == (ODD_WIDTH, ODD_HEIGHT, ODD_FRAMES, 4, DEFAULT_GOP)
    assert h.fps == probe(odd_clip).fps == 25
    assert h.fingerprint == fingerprint(load_model(tiny_model_path))


def test_compress_human_readable_summary(capsys, odd_clip, tiny_model_path, dirs):
    _, dst = dirs
    out = dst / "clip.lvc"
    rc, stdout, _ = cli(capsys, "compress", odd_clip, out, "--model", tiny_model_path, "--quality", "2", "--quiet")
    assert rc == 0
    size = out.stat().st_size
    assert f"{size} bytes" in stdout and f"{ODD_WIDTH}x{ODD_HEIGHT}" in stdout and "quality 2" in stdout
    assert f"{size * 8 / (ODD_FRAMES * ODD_WIDTH * ODD_HEIGHT):.4f} bpp" in stdout


def test_output_gets_normal_permissions(capsys, odd_clip, tiny_model_path, dirs):
    _, dst = dirs
    out = dst / "clip.lvc"
    assert cli(capsys, "compress", odd_clip, out, "--model", tiny_model_path, "--quiet")[0] == 0
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_compress_is_deterministic_and_replaces_existing_output(capsys, odd_clip, tiny_model_path, lvc, dirs):
    _, dst = dirs
    out = dst / "again.lvc"
    out.write_bytes(b"old content")
    assert cli(capsys, "compress", odd_clip, out, "--model", tiny_model_path, "--quiet")[0] == 0
    assert out.read_bytes() == lvc.read_bytes()


@pytest.mark.parametrize("suffix", [".mkv", ".y4m", ".mp4"])
def test_decompress_formats_keep_count_and_size(capsys, lvc, tiny_model, tiny_model_path, dirs, suffix):
    _, dst = dirs
    out = dst / f"decoded{suffix}"
    rc, stdout, err = cli(capsys, "decompress", lvc, out, "--model", tiny_model_path, "--quiet")
    assert rc == 0, err
    assert f"{ODD_FRAMES} frames {ODD_WIDTH}x{ODD_HEIGHT}" in stdout
    assert listing(dst) == {out.name}
    info = probe(out)
    assert (info.width, info.height) == (ODD_WIDTH, ODD_HEIGHT)
    assert info.fps == 25
    frames = read_frames(out)
    assert frames.shape == (ODD_FRAMES, ODD_HEIGHT, ODD_WIDTH, 3)
    _, gen = decode_stream(lvc, tiny_model)
    reference = np.stack(list(gen))
    if suffix == ".mkv":
        np.testing.assert_array_equal(frames, reference)  # FFV1 RGB is lossless
    else:
        assert psnr_rgb(reference, frames) > 35


def test_decompress_is_deterministic(capsys, lvc, tiny_model_path, dirs):
    _, dst = dirs
    a, b = dst / "a.mkv", dst / "b.mkv"
    assert cli(capsys, "decompress", lvc, a, "--model", tiny_model_path, "--quiet")[0] == 0
    assert cli(capsys, "decompress", lvc, b, "--model", tiny_model_path, "--quiet")[0] == 0
    np.testing.assert_array_equal(read_frames(a), read_frames(b))


@pytest.mark.parametrize("which", ["tiny_model_path", "coding_model_path"])
def test_every_quality_level_round_trips(capsys, request, odd_clip, odd_frames, dirs, which):
    """Every level of the tiny model; the "coding" variant has gains and priors that make its latents vary
    (the freshly initialised tiny model rounds nearly all of them to zero)."""
    _, dst = dirs
    coding_model_path = request.getfixturevalue(which)
    model = load_model(coding_model_path)
    sizes = []
    for q in range(1, model.cfg.num_levels + 1):
        lvc_path, mkv = dst / f"q{q}.lvc", dst / f"q{q}.mkv"
        rc, stdout, err = cli(
            capsys, "compress", odd_clip, lvc_path, "--model", coding_model_path, "--quality", q, "--json", "--quiet"
        )
        assert rc == 0, err
        summary = json.loads(stdout)
        assert summary["quality"] == q and summary["bytes"] == lvc_path.stat().st_size
        sizes.append(summary["bytes"])
        rc, _, err = cli(capsys, "decompress", lvc_path, mkv, "--model", coding_model_path, "--quiet")
        assert rc == 0, err
        decoded = read_frames(mkv)
        assert decoded.shape == odd_frames.shape
        # What the decoder wrote is the model's own reconstruction of each frame (eval mode rounds the
        # latent), so the entropy coding in between lost nothing.
        for i in (0, ODD_FRAMES - 1):
            x = _to_tensor(odd_frames[i], model.cfg.stride)
            with torch.no_grad():
                x_hat = model(x, torch.tensor([q - 1]))["x_hat"]
            expected = x_hat[0, :, :ODD_HEIGHT, :ODD_WIDTH].clamp(0, 1).mul(255).round().permute(1, 2, 0)
            diff = np.abs(decoded[i].astype(int) - expected.numpy().astype(int))
            assert diff.max() <= 1, (q, i, diff.max())
    if which == "coding_model_path":
        assert sizes[-1] > sizes[0], sizes


def test_progress_bar_does_not_hide_the_error_line(capsys, lvc, chunks, tiny_model_path, dirs):
    """With --progress the bar goes to stderr too, but the error is still exactly one line of its own."""
    src, dst = dirs
    bad = put(src, "cut.lvc", lvc.read_bytes()[: chunks[4].payload_offset + chunks[4].length // 2])
    rc, _, err = cli(capsys, "decompress", bad, dst / "x.mkv", "--model", tiny_model_path, "--progress")
    assert rc == 2 and "decompress" in err  # the bar was drawn
    errors = [line for line in err.splitlines() if "fedlvc: error:" in line]
    assert len(errors) == 1 and errors[0].startswith(ERROR_PREFIX)
    assert err.rstrip("\n").splitlines()[-1] == errors[0]
    assert listing(dst) == set()


def test_a_script_sees_exactly_the_one_line_error(lvc, chunks, tiny_model_path, dirs):
    """``fedlvc`` run from a script (stderr not a terminal) draws no progress bar: stderr is the error line."""
    import subprocess
    import sys

    src, dst = dirs
    bad = put(src, "cut.lvc", lvc.read_bytes()[: chunks[4].payload_offset + chunks[4].length // 2])
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "client.cli",
            "decompress",
            str(bad),
            str(dst / "x.mkv"),
            "--model",
            str(tiny_model_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and run.stderr.startswith(ERROR_PREFIX), run.stderr
    assert listing(dst) == set()


def test_compress_and_decompress_import_no_federation_or_training_stack(odd_clip, tiny_model_path, dirs):
    """Start fast (issue 34): coding a file needs torch, PyAV and the entropy coder, not Flower, Opacus, Ray,
    matplotlib, SciPy or sympy (torch imports sympy on a first autograd call with grad_outputs): none of them is
    imported by `fedlvc compress` and `fedlvc decompress`, parser included."""
    import subprocess
    import sys

    src, dst = dirs
    script = (
        "import sys\n"
        "from client.cli import main\n"
        f"assert main(['compress', {str(odd_clip)!r}, {str(dst / 'a.lvc')!r}, '--model', {str(tiny_model_path)!r},"
        " '--quiet']) == 0\n"
        f"assert main(['decompress', {str(dst / 'a.lvc')!r}, {str(dst / 'a.y4m')!r}, '--model',"
        f" {str(tiny_model_path)!r}, '--quiet']) == 0\n"
        "heavy = {'flwr', 'opacus', 'ray', 'matplotlib', 'scipy', 'sympy'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]"


# ------------------------------------------------------------------------------------- bad input: compress


def test_evaluate_writes_report_plot_and_grid(capsys, odd_clip, coding_model_path, dirs):
    """fedlvc evaluate: every asked quality (I+P and intra-only) and the baselines on the same frames, BD-rates,
    the JSON report, the RD plot and the reconstruction grid; an output in a missing folder fails first."""
    src, dst = dirs
    outs = [dst / "r.json", dst / "rd.png", dst / "grid.png"]
    args = ["evaluate", odd_clip, "--model", coding_model_path, "--frames", "4", "--qualities", "1", "6"]
    rc, out, err = cli(capsys, *args, "--crfs", "23", "38", "--json", outs[0], "--plot", outs[1], "--grid", outs[2])
    assert rc == 0, err
    report = json.loads(outs[0].read_text())
    codecs = {p["codec"] for p in report["points"]}
    assert {"fedlvc", "x264", "x265"} <= codecs and report["frames"] == 4
    assert set(report["bd_rate_vs"]) == codecs - {"fedlvc"}
    assert all(o.stat().st_size > 0 for o in outs) and "x264" in out
    expect_user_error(capsys, [*args, "--plot", src / "missing" / "rd.png"], folders=[src, dst], match="folder")


def test_compress_missing_input(capsys, tiny_model_path, dirs):
    src, dst = dirs
    msg = expect_user_error(
        capsys,
        ["compress", src / "nope.mp4", dst / "o.lvc", "--model", tiny_model_path],
        folders=[src, dst],
        match="not found",
    )
    assert "nope.mp4" in msg


def test_compress_empty_input(capsys, tiny_model_path, dirs):
    src, dst = dirs
    empty = put(src, "empty.mp4", b"")
    expect_user_error(
        capsys,
        ["compress", empty, dst / "o.lvc", "--model", tiny_model_path],
        inputs=[empty],
        folders=[src, dst],
        match="empty",
    )


def test_compress_directory_input(capsys, tiny_model_path, dirs):
    src, dst = dirs
    (src / "sub.mp4").mkdir()
    expect_user_error(
        capsys, ["compress", src / "sub.mp4", dst / "o.lvc", "--model", tiny_model_path], folders=[src, dst]
    )


@pytest.mark.parametrize(
    "name,data",
    [
        ("random.mp4", np.random.default_rng(0).bytes(20000)),
        ("random.mkv", np.random.default_rng(1).bytes(3000)),
        ("notes.mp4", b"This is a text file, not a video.\n" * 50),
        ("half.mkv", None),  # the first bytes of a real .mkv
    ],
)
def test_compress_non_video(capsys, tiny_model_path, dirs, odd_clip, name, data):
    src, dst = dirs
    if data is None:
        data = odd_clip.read_bytes()[:300]
    bad = put(src, name, data)
    expect_user_error(
        capsys, ["compress", bad, dst / "o.lvc", "--model", tiny_model_path], inputs=[bad], folders=[src, dst]
    )


def test_compress_text_file_named_txt(capsys, tiny_model_path, dirs):
    src, dst = dirs
    bad = put(src, "notes.txt", b"This is a text file, not a video.\n" * 50)
    expect_user_error(
        capsys, ["compress", bad, dst / "o.lvc", "--model", tiny_model_path], inputs=[bad], folders=[src, dst]
    )


@pytest.mark.parametrize("quality", [0, 7, 99, -1])
def test_compress_unknown_quality(capsys, odd_clip, tiny_model_path, dirs, quality):
    src, dst = dirs
    clip = put(src, "clip.mkv", odd_clip.read_bytes())
    msg = expect_user_error(
        capsys,
        ["compress", clip, dst / "o.lvc", "--model", tiny_model_path, "--quality", str(quality)],
        inputs=[clip],
        folders=[src, dst],
        match="quality",
    )
    assert re.search(rf"quality {re.escape(str(quality))}\b", msg), msg


def test_compress_output_in_missing_folder(capsys, odd_clip, tiny_model_path, dirs):
    src, dst = dirs
    clip = put(src, "clip.mkv", odd_clip.read_bytes())
    expect_user_error(
        capsys,
        ["compress", clip, dst / "missing" / "o.lvc", "--model", tiny_model_path],
        inputs=[clip],
        folders=[src, dst],
        match="folder",
    )
    assert not (dst / "missing").exists()


@pytest.mark.parametrize("name", ["o.mkv", "o.lvc.mp4", "o", "o.lvcx"])
def test_compress_output_must_end_in_lvc(capsys, odd_clip, tiny_model_path, dirs, name):
    src, dst = dirs
    clip = put(src, "clip.mkv", odd_clip.read_bytes())
    expect_user_error(
        capsys,
        ["compress", clip, dst / name, "--model", tiny_model_path],
        inputs=[clip],
        folders=[src, dst],
        match=r"\.lvc",
    )


def test_compress_output_equal_to_input(capsys, odd_clip, tiny_model_path, dirs):
    src, _ = dirs
    clip = put(src, "clip.lvc", odd_clip.read_bytes())  # a video that happens to be named .lvc
    expect_user_error(
        capsys, ["compress", clip, clip, "--model", tiny_model_path], inputs=[clip], folders=[src], match="overwrite"
    )
    # Spelled differently, same file.
    expect_user_error(
        capsys,
        ["compress", clip, src / "." / "clip.lvc", "--model", tiny_model_path],
        inputs=[clip],
        folders=[src],
        match="overwrite",
    )


def test_compress_output_is_a_link_to_the_input(capsys, odd_clip, tiny_model_path, dirs):
    src, _ = dirs
    clip = put(src, "clip.mkv", odd_clip.read_bytes())
    (src / "link.lvc").symlink_to(clip)
    expect_user_error(
        capsys,
        ["compress", clip, src / "link.lvc", "--model", tiny_model_path],
        inputs=[clip],
        folders=[src],
        match="overwrite",
    )
    assert (src / "link.lvc").is_symlink()


def test_compress_missing_model(capsys, odd_clip, dirs):
    src, dst = dirs
    clip = put(src, "clip.mkv", odd_clip.read_bytes())
    expect_user_error(
        capsys,
        ["compress", clip, dst / "o.lvc", "--model", src / "nope.safetensors"],
        inputs=[clip],
        folders=[src, dst],
        match="not found",
    )


# ----------------------------------------------------------------------------------- bad input: decompress


def test_decompress_missing_input(capsys, tiny_model_path, dirs):
    src, dst = dirs
    expect_user_error(
        capsys,
        ["decompress", src / "nope.lvc", dst / "o.mkv", "--model", tiny_model_path],
        folders=[src, dst],
        match="not found",
    )


def test_decompress_empty_input(capsys, tiny_model_path, dirs):
    src, dst = dirs
    empty = put(src, "empty.lvc", b"")
    expect_user_error(
        capsys,
        ["decompress", empty, dst / "o.mkv", "--model", tiny_model_path],
        inputs=[empty],
        folders=[src, dst],
        match="empty",
    )


@pytest.mark.parametrize(
    "name,data",
    [
        ("random.lvc", np.random.default_rng(2).bytes(5000)),
        ("notes.lvc", b"This is a text file, not a bitstream.\n" * 20),
        ("short.lvc", b"FL"),
    ],
)
def test_decompress_non_bitstream(capsys, tiny_model_path, dirs, name, data):
    src, dst = dirs
    bad = put(src, name, data)
    expect_user_error(
        capsys, ["decompress", bad, dst / "o.mkv", "--model", tiny_model_path], inputs=[bad], folders=[src, dst]
    )


def test_decompress_foreign_video_file(capsys, odd_clip, tiny_model_path, dirs):
    src, dst = dirs
    clip = put(src, "clip.mkv", odd_clip.read_bytes())
    expect_user_error(
        capsys,
        ["decompress", clip, dst / "o.mkv", "--model", tiny_model_path],
        inputs=[clip],
        folders=[src, dst],
        match="not a fedlvc bitstream",
    )


def _cut_points(chunks):
    c0, c4, c9 = chunks[0], chunks[4], chunks[9]
    return {
        "empty_after_magic": 4,
        "inside_header": 20,
        "header_only": bs.HEADER_SIZE,
        "first_chunk_head_only": c0.payload_offset,
        "later_chunk_head_only": c4.payload_offset,
        "inside_payload": c4.payload_offset + c4.length // 2,
        "inside_last_payload": c9.end - 4,
        "last_byte": c9.end - 1,
    }


@pytest.mark.parametrize(
    "where",
    [
        "empty_after_magic",
        "inside_header",
        "header_only",
        "first_chunk_head_only",
        "later_chunk_head_only",
        "inside_payload",
        "inside_last_payload",
        "last_byte",
    ],
)
def test_decompress_truncated(capsys, lvc, chunks, tiny_model_path, dirs, where):
    src, dst = dirs
    cut = _cut_points(chunks)[where]
    bad = put(src, "cut.lvc", lvc.read_bytes()[:cut])
    expect_user_error(
        capsys, ["decompress", bad, dst / "o.mkv", "--model", tiny_model_path], inputs=[bad], folders=[src, dst]
    )


def _flip_offsets(chunks):
    c4 = chunks[4]
    return {
        "header_version": (4, 0),
        "header_fingerprint": (10, 3),
        "header_quality": (22, 0),
        "header_width": (26, 1),
        "header_frames": (42, 2),
        "header_crc": (bs.HEADER_SIZE - 1, 7),
        "chunk_type": (c4.offset, 0),
        "chunk_length_low": (c4.offset, 1),
        "chunk_length_high": (c4.offset, 6),
        "chunk_head_continuation": (c4.offset, 7),
        "payload_first": (c4.payload_offset, 0),
        "payload_middle": (c4.payload_offset + c4.length // 2, 4),
        "payload_last": (c4.end - 1, 7),
    }


@pytest.mark.parametrize(
    "where",
    [
        "header_version",
        "header_fingerprint",
        "header_quality",
        "header_width",
        "header_frames",
        "header_crc",
        "chunk_type",
        "chunk_length_low",
        "chunk_length_high",
        "chunk_head_continuation",
        "payload_first",
        "payload_middle",
        "payload_last",
    ],
)
def test_decompress_bit_flipped(capsys, lvc, chunks, tiny_model_path, dirs, where):
    src, dst = dirs
    offset, bit = _flip_offsets(chunks)[where]
    data = bytearray(lvc.read_bytes())
    data[offset] ^= 1 << bit
    bad = put(src, "flipped.lvc", bytes(data))
    msg = expect_user_error(
        capsys, ["decompress", bad, dst / "o.mkv", "--model", tiny_model_path], inputs=[bad], folders=[src, dst]
    )
    if where.startswith("payload"):
        assert "frame 4" in msg and "damaged" in msg
    elif where.startswith("header") and where != "header_version":
        assert "checksum" in msg


def test_every_single_bit_flip_is_detected(lvc, chunks, tiny_model):
    """Every single-bit error is caught (the header's CRC-32; in a chunk the head's checks, the latent
    checksum and the exact end of the ANS stream): sweep one bit of every byte of the header and of the
    first, a middle and the last chunk through the decoder API."""
    data = lvc.read_bytes()
    c0, c5, c9 = chunks[0], chunks[5], chunks[9]
    offsets = [*range(0, c0.end), *range(c5.offset, c5.end), *range(c9.offset, len(data))]
    tmp = lvc.parent / "sweep"
    tmp.mkdir(exist_ok=True)
    path = tmp / "flip.lvc"
    for i, offset in enumerate(offsets):
        bad = bytearray(data)
        bad[offset] ^= 1 << (i % 8)
        path.write_bytes(bytes(bad))
        with pytest.raises(FedlvcError):
            _, frames = decode_stream(path, tiny_model)
            for _ in frames:
                pass
    shutil.rmtree(tmp)


def test_decompress_trailing_garbage(capsys, lvc, tiny_model_path, dirs):
    src, dst = dirs
    for i, tail in enumerate([b"\x00", b"garbage!", bytes(9)]):
        bad = put(src, f"tail{i}.lvc", lvc.read_bytes() + tail)
        msg = expect_user_error(
            capsys, ["decompress", bad, dst / "o.mkv", "--model", tiny_model_path], inputs=[bad], folders=[src, dst]
        )
        assert f"{len(tail)} unexpected bytes" in msg


def test_decompress_with_a_different_model(capsys, odd_clip, other_model_path, tiny_model_path, dirs):
    src, dst = dirs
    other = src / "other.lvc"
    assert cli(capsys, "compress", odd_clip, other, "--model", other_model_path, "--quiet")[0] == 0
    msg = expect_user_error(
        capsys, ["decompress", other, dst / "o.mkv", "--model", tiny_model_path], inputs=[other], folders=[src, dst]
    )
    assert "different model" in msg
    # With the right model it decodes.
    assert cli(capsys, "decompress", other, dst / "o.mkv", "--model", other_model_path, "--quiet")[0] == 0


def test_decompress_quality_out_of_range_in_header(capsys, lvc, tiny_model_path, dirs):
    """A header with a valid CRC and the right model, but a quality the model does not have."""
    src, dst = dirs
    data = lvc.read_bytes()
    with open(lvc, "rb") as f:
        h = bs.read_header(f, len(data))
    for q in (0, 7, 200):
        forged = bs.StreamHeader(h.fingerprint, q, h.width, h.height, h.fps, h.frames, h.gop).pack()
        bad = put(src, f"q{q}.lvc", forged + data[bs.HEADER_SIZE :])
        msg = expect_user_error(
            capsys,
            ["decompress", bad, dst / "o.mkv", "--model", tiny_model_path],
            inputs=[bad],
            folders=[src, dst],
            match="quality",
        )
        assert f"quality {q}" in msg


def test_decompress_size_in_header_does_not_match_the_payloads(capsys, lvc, tiny_model_path, dirs):
    """A valid header claiming a larger frame: the payloads then do not decode to the latent shape."""
    src, dst = dirs
    data = lvc.read_bytes()
    with open(lvc, "rb") as f:
        h = bs.read_header(f, len(data))
    forged = bs.StreamHeader(h.fingerprint, h.quality, 640, 480, h.fps, h.frames, h.gop).pack()
    bad = put(src, "big.lvc", forged + data[bs.HEADER_SIZE :])
    expect_user_error(
        capsys, ["decompress", bad, dst / "o.mkv", "--model", tiny_model_path], inputs=[bad], folders=[src, dst]
    )


def test_decompress_output_in_missing_folder(capsys, lvc, tiny_model_path, dirs):
    src, dst = dirs
    stream = put(src, "s.lvc", lvc.read_bytes())
    expect_user_error(
        capsys,
        ["decompress", stream, dst / "missing" / "o.mkv", "--model", tiny_model_path],
        inputs=[stream],
        folders=[src, dst],
        match="folder",
    )


@pytest.mark.parametrize("name", ["o.avi", "o.lvc", "o"])
def test_decompress_unsupported_output_suffix(capsys, lvc, tiny_model_path, dirs, name):
    src, dst = dirs
    stream = put(src, "s.lvc", lvc.read_bytes())
    expect_user_error(
        capsys, ["decompress", stream, dst / name, "--model", tiny_model_path], inputs=[stream], folders=[src, dst]
    )


def test_decompress_output_equal_to_input(capsys, lvc, tiny_model_path, dirs):
    src, _ = dirs
    stream = put(src, "stream.mkv", lvc.read_bytes())  # a bitstream that happens to be named .mkv
    expect_user_error(
        capsys,
        ["decompress", stream, stream, "--model", tiny_model_path],
        inputs=[stream],
        folders=[src],
        match="overwrite",
    )
    stream = put(src, "s.lvc", lvc.read_bytes())
    expect_user_error(
        capsys, ["decompress", stream, stream, "--model", tiny_model_path], inputs=[stream], folders=[src]
    )


def test_decompress_output_is_a_directory(capsys, lvc, tiny_model_path, dirs):
    src, dst = dirs
    stream = put(src, "s.lvc", lvc.read_bytes())
    (dst / "o.mkv").mkdir()
    expect_user_error(
        capsys, ["decompress", stream, dst / "o.mkv", "--model", tiny_model_path], inputs=[stream], folders=[src, dst]
    )


def test_read_header_of_real_stream_matches_chunks(lvc, chunks):
    data = lvc.read_bytes()
    h = bs.read_header(io.BytesIO(data), len(data))
    assert h.frames == len(chunks)
    assert struct.unpack(">I", data[bs.HEADER_SIZE - 4 : bs.HEADER_SIZE])[0] != 0
