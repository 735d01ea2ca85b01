"""What the server accepts from a site. Every reply is checked before it is averaged or recorded: a bad reply
is dropped with the reason (``history.json → rounds[].dropped``) and never crashes the run.

A site is who Flower says sent the reply (its node id), not a name or number it reports: the name a site
reports is only a label, made unique per run (a second node claiming a taken name is recorded as
``<name>@node_<id>``), so no site can overwrite another's record. The ``node_<id>`` form belongs to the server:
it labels a node that names no site (a silent or failed one included), and a node claiming it for another id is
labelled by its own. Each record carries the node id, which is what names a site.
"""

from __future__ import annotations

import io
import math
import re

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.common.constant import SType

from common.config.fedconfig import RunConfig
from common.errors import FedlvcError
from common.train.privacy import checked_history

_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_RESERVED = re.compile(r"node_[0-9]+", re.IGNORECASE)  # the server's labels of nodes by id
_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
MAX_NOTE = 500  # characters of a site's note (why it declined or refused) kept in history.json


def clip_note(text: str) -> str:
    """A site's note or an error reason, kept to ``MAX_NOTE`` characters: its start and its end (where a
    traceback names the exception)."""
    text = str(text)
    return text if len(text) <= MAX_NOTE else f"{text[:150]} … {text[-(MAX_NOTE - 153) :]}"


class BadReply(Exception):
    """Why a reply is dropped."""


class SiteRegistry:
    """Labels of the run's sites, one per Flower node id, pinned at the node's first reply."""

    def __init__(self):
        self.labels: dict[int, str] = {}

    def label(self, node_id: int, claimed: str | None) -> str:
        if node_id not in self.labels:
            own = f"node_{node_id}"
            name = claimed if claimed and _NAME.fullmatch(claimed) and not _RESERVED.fullmatch(claimed) else own
            if name in self.labels.values():
                name = f"{name}@{own}"
            self.labels[node_id] = name
        return self.labels[node_id]

    def known(self, node_id: int) -> str:
        """A node's label so far, else ``node_<id>`` (a node that never named itself: silent, or only failed)."""
        return self.labels.get(int(node_id), f"node_{node_id}")

    def node_of(self, label: str) -> int | None:
        """The node id behind a label (None for a label no node of this run has)."""
        found = [n for n, name in self.labels.items() if name == label]
        by_id = re.fullmatch(r"node_([0-9]+)", label)
        return found[0] if found else (int(by_id.group(1)) if by_id else None)

    def of(self, msg: Message) -> str:
        """The label of a reply's sender (an error reply carries no name: its node's label so far)."""
        node = int(msg.metadata.src_node_id)
        if msg.has_error():
            return self.known(node)
        return self.label(node, site_field(msg, "name"))


def site_field(msg: Message, key: str) -> str | None:
    """A string the site put in its reply's ``site`` record (its name, why it declined), or None."""
    try:
        value = msg.content.config_records["site"][key]
    except (KeyError, TypeError, AttributeError):
        return None
    return clip_note(value) if isinstance(value, str) else None


SECAGG_RECORDS = frozenset({"fitres.num_examples"})  # what Flower's SecAgg+ mod leaves beside ours


def _metrics(msg: Message, also=frozenset()):
    records = msg.content.metric_records
    if set(records) - also != {"metrics"}:
        raise BadReply(f"expected one MetricRecord 'metrics', got {sorted(records)}")
    return records["metrics"]


def number(
    metrics, key: str, lo: float = -math.inf, hi: float = math.inf, integer: bool = False, infinite: bool = False
) -> float:
    """One scalar of a site's metrics, checked: a number (not a list or bool), not nan, finite unless
    ``infinite``, in [lo, hi], an integer if ``integer``."""
    if key not in metrics:
        raise BadReply(f"metric {key!r} is missing")
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadReply(f"metric {key!r} is not a number")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not infinite) or not lo <= value <= hi:
        raise BadReply(f"metric {key!r} = {value} is out of range")
    if integer and not value.is_integer():
        raise BadReply(f"metric {key!r} = {value} is not an integer")
    return value


def _numbers(metrics, key: str, length: int | None = None) -> list[float]:
    value = metrics.get(key)
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
        raise BadReply(f"metric {key!r} is not a list of numbers")
    if length is not None and len(value) != length:
        raise BadReply(f"metric {key!r} has {len(value)} values, expected {length}")
    return [float(v) for v in value]


def decoded(key: str, array: Array, dtype: np.dtype, shape: tuple) -> np.ndarray:
    """An array's bytes as the ndarray they hold, which must be ``dtype`` and ``shape``: what is averaged is the
    bytes, and a site writes them independently of the dtype and shape beside them. The ``.npy`` header is read
    and checked before any data is, so a forged size allocates nothing."""
    if array.stype != SType.NUMPY or not isinstance(array.data, bytes):
        raise BadReply(f"array {key!r} is not a numpy array (stype {clip_note(array.stype)[:40]!r})")
    stream = io.BytesIO(array.data)
    try:
        got_shape, _, got_dtype = _NPY_HEADERS[np.lib.format.read_magic(stream)](stream)
    except Exception:  # whatever went wrong reading them, these bytes are not a .npy array
        raise BadReply(f"array {key!r} is not a .npy array") from None
    if got_dtype != dtype or tuple(got_shape) != shape:
        raise BadReply(f"array {key!r} decodes to {got_dtype}{list(got_shape)}, expected {dtype}{list(shape)}")
    if len(array.data) - stream.tell() != math.prod(shape) * dtype.itemsize:
        raise BadReply(f"array {key!r} holds {len(array.data) - stream.tell()} bytes of data, not its shape's")
    value = array.numpy()
    if value.dtype != dtype or value.shape != shape:  # what np.load made of them, compared again
        raise BadReply(f"array {key!r} decodes to {value.dtype}{list(value.shape)}, expected {dtype}{list(shape)}")
    return value


def checked_arrays(msg: Message, expected: ArrayRecord) -> list[np.ndarray]:
    """The reply's model, decoded: exactly the global model's keys, shapes and dtypes (those the metadata says
    and those the bytes hold), every value finite; the arrays in the global model's order."""
    records = msg.content.array_records
    if set(records) != {"arrays"}:
        raise BadReply(f"expected one ArrayRecord 'arrays', got {sorted(records)}")
    arrays = records["arrays"]
    if list(arrays.keys()) != list(expected.keys()):
        extra, missing = set(arrays.keys()) - set(expected.keys()), set(expected.keys()) - set(arrays.keys())
        if not (extra or missing):  # averaged by position: another order would mix tensors
            raise BadReply("model arrays are in another order than the global model's")
        raise BadReply(
            f"model arrays differ from the global model's (extra {sorted(extra)[:5]}, missing {sorted(missing)[:5]})"
        )
    out = []
    for key, array in arrays.items():
        want = expected[key]
        if tuple(array.shape) != tuple(want.shape) or array.dtype != want.dtype:
            raise BadReply(
                f"array {key!r} is {array.dtype}{list(array.shape)}, expected {want.dtype}{list(want.shape)}"
            )
        value = decoded(key, array, np.dtype(want.dtype), tuple(want.shape))
        if not np.isfinite(value).all():
            raise BadReply(f"array {key!r} holds values that are not finite")
        out.append(value)
    return out


def checked_train_metrics(msg: Message, rc: RunConfig) -> dict:
    """A training reply's record for ``history.json``; its weight (``num_examples``) is positive and no larger
    than the units the site holds, which is no larger than the run lets a site hold (``site-max-frames`` of
    its videos, all frames of its generated clips, or ``site-frames`` of a streamed simulated site). Under
    secure aggregation the reply also carries Flower's SecAgg+ records (its update is in the masked sum)."""
    m = _metrics(msg, SECAGG_RECORDS if rc.secure_aggregation else frozenset())
    declined = number(m, "declined", 0, 1, integer=True) == 1
    most = max(rc.site_max_frames, rc.demo_clips * rc.demo_frames, rc.site_frames)
    units = int(number(m, "units", 1, most, integer=True))
    examples = int(number(m, "num-examples", 0, units, integer=True))
    if declined != (examples == 0):
        raise BadReply("a reply trains on examples exactly when it does not decline")
    unit_frames = int(number(m, "unit-frames", 1, 64, integer=True))
    if unit_frames != rc.unit_frames:
        raise BadReply(f"the site trained privacy units of {unit_frames} frames; the run asks for {rc.unit_frames}")
    sigma, rate = _numbers(m, "dp_sigma"), _numbers(m, "dp_sample_rate", len(_numbers(m, "dp_sigma")))
    steps = _numbers(m, "dp_steps", len(sigma))
    try:
        history = checked_history([(s, q, n) for s, q, n in zip(sigma, rate, steps) if n > 0], "dp history")
    except FedlvcError as e:
        raise BadReply(str(e)) from None
    record = {
        "epsilon": number(m, "epsilon", 0, infinite=True),
        "delta": number(m, "delta", 0, 1),
        "noise_multiplier": number(m, "noise_multiplier", 0),
        "max_grad_norm": number(m, "max_grad_norm", 0),
        "sample_rate": number(m, "sample_rate", 0, 1),
        "steps": int(number(m, "steps", 0, integer=True)),
        "dp_history": [list(h) for h in history],
        "num_examples": examples,
        "units": units,
        "privacy_unit": "segment" if unit_frames > 1 else "frame",
        "unit_frames": unit_frames,
        "declined": declined,
        "accountant": site_field(msg, "accountant"),
    }
    if declined:
        record["declined_reason"] = site_field(msg, "note") or "(no reason given)"
    elif "train_loss" in m:  # released by the site's choice, for a round it trained
        record["train_loss"] = number(m, "train_loss")
    return record


def refusal(msg: Message) -> str | None:
    """The site's reason when it refused a query (an evaluation, rd or compress), else None."""
    m = _metrics(msg)
    return (site_field(msg, "note") or "(no reason given)") if "refused" in m else None


def answers(replies, registry: SiteRegistry, check) -> dict:
    """{site: check(reply)} of the replies to a query or an evaluation, or {site: {"refused" | "dropped": why}}."""
    out = {}
    for msg in replies:
        label = registry.of(msg)
        try:
            if msg.has_error():
                raise BadReply(clip_note(msg.error.reason))
            why = refusal(msg)
            out[label] = {"refused": why} if why else check(msg)
        except BadReply as e:
            out[label] = {"dropped": str(e)}
    return out


def checked_eval_metrics(msg: Message) -> dict:
    m = _metrics(msg)
    return {
        "bpp": number(m, "bpp", 0),
        "psnr": number(m, "psnr", 0, 200),
        "ms_ssim": number(m, "ms_ssim", -1, 1),
        "frames": int(number(m, "num-examples", 1, integer=True)),
    }


def checked_rd_curves(msg: Message, names, levels: int, optional=()) -> dict:
    """{model name: [(bpp, psnr) per quality level]} of a query.rd reply: every one of ``names``, and those of
    ``optional`` the site sent."""
    m = _metrics(msg)
    curves = {}
    for name in [*names, *(n for n in optional if f"bpp-{n}" in m or f"psnr-{n}" in m)]:
        bpp, psnr = _numbers(m, f"bpp-{name}", levels), _numbers(m, f"psnr-{name}", levels)
        if not all(b > 0 and math.isfinite(b) and 0 <= p <= 200 for b, p in zip(bpp, psnr)):
            raise BadReply(f"the {name} curve holds values out of range")
        curves[name] = list(zip(bpp, psnr))
    return curves


def checked_compress_summary(msg: Message) -> dict | None:
    """The summary of a site's final compression, or None when the site does not release one."""
    m = _metrics(msg)
    if "compressed" in m and "bytes" not in m:
        return None
    return {
        "bytes": number(m, "bytes", 0, integer=True),
        "frames": number(m, "frames", 0, integer=True),
        "bpp": number(m, "bpp", 0),
        "psnr": number(m, "psnr", 0, 200),
        "quality": number(m, "quality", 1, 16),
        **({"personal": int(number(m, "personal", 0, 1, integer=True))} if "personal" in m else {}),
    }
