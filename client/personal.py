"""A site's personal model (run config ``personal-steps``): the final global model with its ``personal-parts``
(by default its entropy parameters: quantization gains and priors, and v4's hyperprior; or FiLM adapters on the
transforms; or all) fine-tuned on the site's own training frames, without noise. It never leaves the site: it
is stored under the site's ``state-dir`` (a simulated site without one: ``runs/sites/<site>/personal``), never
put in a reply, and costs no ε because nothing trained on it is released except what the site's ``release``
policy allows (the query.rd curves, measured on held-out frames). The site's final compression uses it; a
``.lvc`` header carries the fingerprint of the model that wrote it, so a stream made with a personal model
decodes only with that personal model.

What it is not: anyone who gets the personal model and a stream decodes the stream (as with any model), and
the personal model was trained on the site's frames without noise — it must not be shared.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

from common.checkpoint import fingerprint, load_model, save_model
from common.config.fedconfig import RunConfig
from common.errors import FedlvcError
from common.net.model import FedlvcCodec, with_adapters
from common.train.training import local_train

from .ledger import state_dir_of
from .policy import SitePolicy
from .site import SIMULATED_OUT


def personal_dir(node_config, name: str) -> Path | None:
    """Where the site keeps its personal models: ``<state-dir>/personal``; a simulated site without a state-dir
    ``runs/sites/<name>/personal``; a site with real video and no state-dir keeps none."""
    state_dir = state_dir_of(node_config)
    if state_dir is not None:
        return state_dir / "personal"
    if node_config.get("video-dir"):
        return None
    return SIMULATED_OUT / name / "personal"


def why_no_personal(rc: RunConfig, policy: SitePolicy, folder: Path | None) -> str:
    """Why this site compresses with the global model although the run asks for a personal one ("" = it does not)."""
    if folder is None:
        return "no personal model: a site with real video keeps one only under its state-dir"
    if policy.max_local_steps is not None and rc.personal_steps > policy.max_local_steps:
        return (
            f"no personal model: personal-steps {rc.personal_steps} is more than the site's max-local-steps "
            f"{policy.max_local_steps}"
        )
    return ""


def personal_file(global_fingerprint: str, rc: RunConfig) -> str:
    """The file name of the personal model a site trains from the global model with this fingerprint (hex) under
    ``rc``'s personal settings: one per global model, steps, privacy unit, parts and learning rate."""
    key = f"{global_fingerprint[:16]}-{rc.personal_steps}-{rc.privacy_unit}{rc.unit_frames}-{rc.personal_parts}"
    if rc.personal_learning_rate:  # (the name of a personal model trained at the run's rate stays as it was)
        key += f"-lr{rc.personal_learning_rate:g}"
    return f"personal-{key}.safetensors"


def personal_seed(rc: RunConfig, number: int) -> int:
    """The seed a site trains its personal model with (its crops and sampling): the run's seed and its number."""
    return rc.seed + 7919 + number


def personal_model(
    global_model: FedlvcCodec, rows: list, rc: RunConfig, policy: SitePolicy, node_config, name: str, seed: int
) -> tuple[FedlvcCodec, str]:
    """(the model this site codes its own video with, a note): the global model when ``personal-steps`` is 0 or
    the site keeps none (the note says why), else its personal model — loaded when this site already trained one
    from the same global model and settings, else trained now and stored."""
    if rc.personal_steps == 0:
        return global_model, ""
    folder = personal_dir(node_config, name)
    note = why_no_personal(rc, policy, folder)
    if note:
        return global_model, note
    global_fp = fingerprint(global_model).hex()
    parts = rc.personal_parts
    lr = rc.personal_learning_rate or rc.learning_rate
    path = folder / personal_file(global_fp, rc)
    if path.is_file():
        try:
            return load_model(path), ""
        except FedlvcError:
            pass  # damaged: train it again
    model = copy.deepcopy(global_model).train()
    if parts == "adapters" and not model.cfg.adapters:
        model = with_adapters(model)  # identity adapters: the global model's coding until trained
    settings = dataclasses.replace(rc, local_steps=rc.personal_steps, train_parts=parts, learning_rate=lr)
    local_train(model, rows, settings, None, seed)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"personal": True, "global_fingerprint": global_fp, "steps": rc.personal_steps, "parts": parts, "lr": lr}
    save_model(path, model.eval(), meta)
    return model, ""
