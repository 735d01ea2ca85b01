"""Secure aggregation at the site: Flower's SecAgg+ client mod (``flwr.client.mod.secaggplus_mod``).

Under SecAgg+ the server drives four stages of TRAIN messages (keys, encrypted key shares, the masked update,
the unmasking shares); only the third calls the site's ``train``. Flower's SecAgg+ mod sits on the legacy
``FitIns``/``FitRes`` layout: the model arrives as ``fitins.parameters`` (unnamed arrays in ``state_dict``
order) with ``fitins.config``, and the mod masks the ``fitres.parameters`` of the reply and then empties every
array record of it, so nothing but the masked vector leaves the site. What the site puts there is its *update*
(trained model − received model), with weight 1 when it trained and 0 when it declined: every site that
trains counts once in the server's average (a weight the server cannot see is not one it could check).

Whether a reply is masked is known here, not read from the message: :func:`secure_aggregation_mod` marks the
call it hands to Flower's mod, and ``train`` asks :func:`masked`."""

from __future__ import annotations

import contextvars

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord
from flwr.client.mod import secaggplus_mod
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from common.errors import FedlvcError

_MASKED = contextvars.ContextVar("fedlvc_secagg_masked", default=False)
FITINS_ARRAYS, FITINS_CONFIG = "fitins.parameters", "fitins.config"


def secure_aggregation_mod(msg: Message, context: Context, call_next) -> Message:
    """A TRAIN message of the SecAgg+ protocol goes through Flower's ``secaggplus_mod`` (which masks the reply
    of our ``train``); any other message goes straight on."""
    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    token = _MASKED.set(True)
    try:
        return secaggplus_mod(msg, context, call_next)
    finally:
        _MASKED.reset(token)


def masked() -> bool:
    """Whether the running ``train`` answers inside the SecAgg+ protocol (its reply is masked by Flower's mod)."""
    return _MASKED.get()


def train_config(content) -> ConfigRecord:
    """The train config of a message: ``config``, or ``fitins.config`` under SecAgg+."""
    records = content.config_records
    key = FITINS_CONFIG if masked() and FITINS_CONFIG in records else "config"
    if key not in records:
        raise FedlvcError("the server's message carries no config record")
    return records[key]


def positional_state_dict(record: ArrayRecord, names: list[str]) -> dict[str, torch.Tensor]:
    """``fitins.parameters`` (arrays keyed 0, 1, ... in ``state_dict`` order) as a state dict of ``names``."""
    try:
        order = sorted(record.keys(), key=int)
        arrays = [bytes_to_ndarray(record[k].data) for k in order]
    except (ValueError, TypeError, OSError, EOFError) as e:  # np.load of bytes that are no .npy (never pickles)
        raise FedlvcError(f"the server's fitins.parameters are malformed: {str(e)[:200]}") from None
    if [int(k) for k in order] != list(range(len(names))):
        raise FedlvcError(f"the server sent {len(order)} arrays; the model-config has {len(names)}")
    return {name: torch.from_numpy(np.array(a)) for name, a in zip(names, arrays)}


def masked_update_records(trained: dict, received: dict, contributes: bool) -> dict:
    """The ``fitres.*`` records Flower's SecAgg+ mod reads: the site's update (trained − received, float64, in
    ``state_dict`` order; zeros when it declined), weight 1 (it trained) or 0, no metrics of Flower's own."""
    update = {
        str(i): Array(
            (trained[k].detach().double() - received[k].double()).cpu().numpy()
            if contributes
            else np.zeros(tuple(received[k].shape))
        )
        for i, k in enumerate(received)
    }
    return {
        "fitres.parameters": ArrayRecord(update),
        "fitres.num_examples": MetricRecord({"num_examples": int(contributes)}),
        "fitres.metrics": ConfigRecord({}),
        "fitres.status": ConfigRecord({"code": 0, "message": "ok"}),
    }
