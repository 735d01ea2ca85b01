"""Model checkpoints: safetensors weights + a JSON config beside them, never pickles.

A checkpoint ``NAME.safetensors`` has ``NAME.json`` next to it holding ``{"config": CodecConfig, "meta": {...},
"fingerprint": hex}``. The fingerprint (a hash of the architecture config and every tensor's name, shape,
dtype and bytes: the weights and, for v4, the integer coding tables) goes into each ``.lvc`` header so a stream is
never decoded with another model.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common.coding.hypercoder import CodingTables, coding_tables
from common.data.video import atomic_output
from common.net.architecture import CodecConfig
from common.net.model import FedlvcCodec

from .errors import FedlvcError

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
DEFAULT_MODEL_NAME = "fedlvc-default.safetensors"
DEFAULT_MODEL = PRETRAINED_DIR / DEFAULT_MODEL_NAME


def default_model_path() -> Path:
    """The shipped model. Flower runs apps from a copy of their Python sources (the FAB), which carries no
    weights, so also look in the installed ``fedlvc`` distribution (or its editable source tree)."""
    if DEFAULT_MODEL.is_file():
        return DEFAULT_MODEL
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        dist = distribution("fedlvc")
        candidate = Path(str(dist.locate_file(f"common/pretrained/{DEFAULT_MODEL_NAME}")))
        if candidate.is_file():
            return candidate
        direct = json.loads(dist.read_text("direct_url.json") or "{}")
        url = direct.get("url", "")
        if direct.get("dir_info", {}).get("editable") and url.startswith("file://"):
            candidate = Path(url[len("file://") :]) / "common" / "pretrained" / DEFAULT_MODEL_NAME
            if candidate.is_file():
                return candidate
    except (PackageNotFoundError, ValueError, OSError):
        pass
    return DEFAULT_MODEL


FINGERPRINT_BYTES = 16


def fingerprint(model: FedlvcCodec) -> bytes:
    """16-byte SHA-256 prefix over the architecture config and the weights (names, shapes, dtypes, bytes)."""
    return _digest(model.cfg.to_dict(), _tensors(model))


def _digest(config: dict, tensors: dict) -> bytes:
    """:func:`fingerprint` of an architecture config (``CodecConfig.to_dict``) and what a checkpoint of it holds."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name, t in sorted(tensors.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.numpy().tobytes())
    return h.digest()[:FINGERPRINT_BYTES]


def _tensors(model: FedlvcCodec) -> dict:
    """What a checkpoint holds: the weights and, for architecture v4, the integer coding tables derived from them
    (``tables.*``; never part of ``state_dict``, so never averaged)."""
    state = dict(model.state_dict())
    if model.cfg.hyper:
        state.update(coding_tables(model).to_tensors())
    return state


def config_path(weights: str | os.PathLike) -> Path:
    return Path(weights).with_suffix(".json")


def save_model(path: str | os.PathLike, model: FedlvcCodec, meta: dict | None = None) -> None:
    """Write ``path`` (.safetensors) and its ``.json`` atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise FedlvcError(f"a checkpoint path must end in .safetensors: {path}")
    state = {k: v.detach().cpu().contiguous() for k, v in _tensors(model).items()}
    doc = {"config": model.cfg.to_dict(), "meta": meta or {}, "fingerprint": fingerprint(model).hex()}
    with atomic_output(path) as tmp:
        save_file(state, str(tmp))
    with atomic_output(config_path(path)) as tmp:
        tmp.write_text(json.dumps(doc, indent=2))


def read_meta(path: str | os.PathLike) -> dict:
    try:
        return json.loads(config_path(path).read_text()).get("meta", {})
    except (OSError, ValueError):
        return {}


def load_model(path: str | os.PathLike | None = None) -> FedlvcCodec:
    """Load a checkpoint (the shipped default when ``path`` is None) in eval mode; refuse anything that is
    not a safetensors file matching its JSON config and fingerprint. The fingerprint is that of the file's own
    config and tensors, so the built model is never hashed back."""
    path = Path(path) if path is not None else default_model_path()
    if not path.is_file():
        if path == DEFAULT_MODEL:
            raise FedlvcError(f"the shipped default model is missing ({path}); pass --model")
        raise FedlvcError(f"model checkpoint not found: {path}")
    cfg_file = config_path(path)
    if not cfg_file.is_file():
        raise FedlvcError(f"model config not found next to the checkpoint: {cfg_file}")
    try:
        doc = json.loads(cfg_file.read_text())
        cfg = CodecConfig.from_dict(doc["config"])
    except (ValueError, KeyError, TypeError) as e:
        raise FedlvcError(f"model config {cfg_file} is not valid: {e}") from None
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise FedlvcError(f"model checkpoint {path} is not a valid safetensors file: {e}") from None
    digest = _digest(cfg.to_dict(), state)  # of the file as it is; compared last, after the refusals that say more
    model = _build(path, cfg, state)
    if "fingerprint" in doc and doc["fingerprint"] != digest.hex():
        raise FedlvcError(f"model checkpoint {path} does not match the fingerprint in {cfg_file.name}")
    return model


def _build(path: Path, cfg: CodecConfig, state: dict) -> FedlvcCodec:
    """The model of config ``cfg`` holding the tensors ``state`` of checkpoint ``path`` (v4: its weights and its
    integer coding tables), in eval mode; refused unless they are exactly the finite tensors it needs."""
    model = FedlvcCodec(cfg)
    tables = {k: state.pop(k) for k in list(state) if k.startswith("tables.")} if cfg.hyper else {}
    expected = model.state_dict()
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise FedlvcError(
            f"model checkpoint {path} does not match its config (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    for k, v in state.items():
        if v.shape != expected[k].shape or v.dtype != expected[k].dtype:
            raise FedlvcError(
                f"model checkpoint {path}: tensor {k} has shape {tuple(v.shape)} {v.dtype}, "
                f"expected {tuple(expected[k].shape)} {expected[k].dtype}"
            )
        if not torch.isfinite(v).all():
            raise FedlvcError(f"model checkpoint {path}: tensor {k} holds non-finite values")
    model.load_state_dict(state)
    if cfg.hyper:
        model._coding_tables = CodingTables.from_tensors(tables, model)
    return model.eval()
