"""Video I/O: lossless FFV1 .mkv at odd sizes, streamed decoding, atomic writing."""

from __future__ import annotations

import inspect
from fractions import Fraction

import numpy as np
import pytest
from conftest import ODD_FRAMES, ODD_HEIGHT, ODD_WIDTH

from common.data.video import VideoWriter, check_output_path, iter_frames, probe, read_frames, write_video
from common.errors import FedlvcError


@pytest.mark.parametrize("width,height", [(70, 45), (33, 17), (1, 1), (3, 2)])
def test_ffv1_mkv_is_lossless_at_odd_sizes(tmp_path, width, height):
    rng = np.random.default_rng(width * 1000 + height)
    frames = rng.integers(0, 256, (5, height, width, 3), dtype=np.uint8)  # noise: nothing to smooth over
    frames[0] = 0
    frames[1] = 255
    path = tmp_path / "v.mkv"
    write_video(path, frames, Fraction(30000, 1001))
    back = read_frames(path)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, frames)
    info = probe(path)
    assert (info.width, info.height) == (width, height)
    assert info.fps == Fraction(30000, 1001)


def test_odd_clip_fixture_round_trips(odd_clip, odd_frames):
    assert odd_frames.shape == (ODD_FRAMES, ODD_HEIGHT, ODD_WIDTH, 3)
    np.testing.assert_array_equal(read_frames(odd_clip), odd_frames)
    info = probe(odd_clip)
    assert (info.width, info.height, info.fps) == (ODD_WIDTH, ODD_HEIGHT, 25)
    assert info.frames in (None, ODD_FRAMES)


@pytest.mark.parametrize("suffix", [".y4m", ".mp4"])
def test_other_output_formats_keep_size_and_count(tmp_path, odd_frames, suffix):
    path = tmp_path / f"v{suffix}"
    write_video(path, odd_frames)
    back = read_frames(path)
    assert back.shape == odd_frames.shape
    err = np.abs(back.astype(int) - odd_frames.astype(int)).mean()
    assert err < 3, err


def test_iter_frames_is_a_lazy_generator(odd_clip, odd_frames):
    it = iter_frames(odd_clip)
    assert inspect.isgenerator(it)
    first = next(it)
    np.testing.assert_array_equal(first, odd_frames[0])
    assert first.shape == (ODD_HEIGHT, ODD_WIDTH, 3) and first.dtype == np.uint8
    rest = list(it)
    assert len(rest) == ODD_FRAMES - 1
    np.testing.assert_array_equal(rest[-1], odd_frames[-1])


def test_iter_frames_does_not_touch_the_file_until_iterated(tmp_path):
    it = iter_frames(tmp_path / "missing.mkv")  # no error yet: nothing is opened before the first frame
    with pytest.raises(FedlvcError, match="not found"):
        next(it)


@pytest.mark.parametrize("max_frames", [1, 3, ODD_FRAMES, ODD_FRAMES + 5])
def test_max_frames(odd_clip, odd_frames, max_frames):
    got = list(iter_frames(odd_clip, max_frames=max_frames))
    n = min(max_frames, ODD_FRAMES)
    assert len(got) == n
    np.testing.assert_array_equal(np.stack(got), odd_frames[:n])
    assert read_frames(odd_clip, max_frames).shape[0] == n


def test_start_skips_frames(odd_clip, odd_frames):
    got = read_frames(odd_clip, max_frames=3, start=4)
    np.testing.assert_array_equal(got, odd_frames[4:7])


def test_iter_frames_stops_early_without_decoding_everything(odd_clip):
    it = iter_frames(odd_clip, max_frames=2)
    assert len(list(it)) == 2
    it.close()  # closing a finished generator is fine


def test_video_writer_leaves_no_file_on_exception(tmp_path, odd_frames):
    path = tmp_path / "out.mkv"
    with pytest.raises(RuntimeError, match="boom"):
        with VideoWriter(path, ODD_WIDTH, ODD_HEIGHT) as writer:
            writer.write(odd_frames[0])
            writer.write(odd_frames[1])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_video_writer_leaves_no_file_on_keyboard_interrupt(tmp_path, odd_frames):
    path = tmp_path / "out.mp4"
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(path, ODD_WIDTH, ODD_HEIGHT) as writer:
            writer.write(odd_frames[0])
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_video_writer_keeps_an_existing_file_on_failure(tmp_path, odd_frames):
    path = tmp_path / "out.mkv"
    path.write_bytes(b"previous")
    with pytest.raises(ValueError):
        with VideoWriter(path, ODD_WIDTH, ODD_HEIGHT) as writer:
            writer.write(odd_frames[0])
            raise ValueError("stop")
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mkv"]


def test_video_writer_file_appears_only_on_close(tmp_path, odd_frames):
    path = tmp_path / "out.mkv"
    writer = VideoWriter(path, ODD_WIDTH, ODD_HEIGHT)
    writer.write(odd_frames[0])
    assert not path.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")]
    writer.close()
    assert path.is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["out.mkv"]
    assert read_frames(path).shape == (1, ODD_HEIGHT, ODD_WIDTH, 3)


def test_check_output_path(tmp_path):
    assert check_output_path(tmp_path / "a.MKV").name == "a.MKV"
    with pytest.raises(FedlvcError, match="must end in"):
        check_output_path(tmp_path / "a.avi")
    with pytest.raises(FedlvcError, match="folder does not exist"):
        check_output_path(tmp_path / "missing" / "a.mkv")
    (tmp_path / "d.mkv").mkdir()
    with pytest.raises(FedlvcError, match="directory"):
        check_output_path(tmp_path / "d.mkv")


def test_probe_refuses_non_videos(tmp_path):
    for name, data in [("e.mkv", b""), ("r.mp4", np.random.default_rng(0).bytes(4000))]:
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(FedlvcError):
            probe(p)
    with pytest.raises(FedlvcError, match="directory"):
        probe(tmp_path)
    with pytest.raises(FedlvcError, match="not found"):
        probe(tmp_path / "nope.mkv")


def test_reading_a_truncated_clip_fails_cleanly_or_gives_a_prefix(tmp_path, odd_clip, odd_frames):
    """A cut FFV1 file either decodes to a prefix of the frames or raises FedlvcError, nothing else."""
    data = odd_clip.read_bytes()
    p = tmp_path / "cut.mkv"
    for cut in (len(data) // 3, len(data) // 2, len(data) - 10):
        p.write_bytes(data[:cut])
        try:
            got = read_frames(p)
        except FedlvcError:
            continue
        assert 0 < len(got) <= ODD_FRAMES
        np.testing.assert_array_equal(got[:-1], odd_frames[: len(got) - 1])


def test_sample_frames_is_bounded_uniform_and_ordered(tmp_path):
    from fractions import Fraction

    from common.data.clips import generate_site_clip, sample_frames
    from common.data.video import read_frames, write_video

    paths = []
    for c in range(2):
        p = tmp_path / f"c{c}.mkv"
        write_video(p, generate_site_clip(2, c, 32, 24, 15), Fraction(25))
        paths.append(p)
    everything = [f for p in paths for f in read_frames(p)]
    kept = sample_frames(paths, 7, seed=3)
    assert len(kept) == 7
    index = [next(i for i, f in enumerate(everything) if np.array_equal(f, k)) for k in kept]
    assert index == sorted(index) and len(set(index)) == 7  # distinct frames, original order
    assert max(index) >= 15  # drawn from both videos, not just the first
    assert len(sample_frames(paths, 100)) == 30  # fewer frames than the limit: all of them
