"""The fedlvc Flower ClientApp: DP local training, federated evaluation, and the final compression of the
site's own video. Replies carry the model's arrays and scalar metrics only; frames stay at the site.

The run config and every message come from whoever submits the run. What protects the site's data is
decided here, from the site's own node config (``client.policy``) and disk (``client.ledger``): the privacy
policy, the ledger, what the site releases and where it writes."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from common.codec import decode_stream, encode_frames
from common.config.fedconfig import RunConfig
from common.errors import FedlvcError
from common.eval.metrics import psnr_rgb
from common.net.architecture import CodecConfig
from common.net.model import FedlvcCodec
from common.train.privacy import DPConfig, poisson_sample_rate
from common.train.training import local_train

from .ledger import earlier_ledger, open_ledger, state_dir_of
from .measure import coding_gop, measure, rd_points
from .personal import personal_model, personal_seed
from .policy import SitePolicy
from .secure import FITINS_ARRAYS, masked, masked_update_records, positional_state_dict, secure_aggregation_mod
from .secure import train_config as _config
from .site import clip_frame_sizes, load_site, site_clips, site_identity, site_out_dir

app = ClientApp()


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_params(cfg: CodecConfig) -> int:
    """Parameters of a model of this config, counted without allocating it (torch's meta device)."""
    with torch.device("meta"):
        return sum(p.numel() for p in FedlvcCodec(cfg).parameters())


def _config_from(msg: Message) -> CodecConfig:
    """The model config in a message, within ``CodecConfig``'s limits (nothing built)."""
    try:
        return CodecConfig.from_dict(json.loads(str(_config(msg.content)["model-config"])))
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise FedlvcError(f"the server's model-config is malformed: {e}") from None


def _model_from(msg: Message, policy: SitePolicy, key: str = "arrays") -> FedlvcCodec:
    """The model in a message, checked before it is built: its config within ``CodecConfig``'s limits and
    the site's memory, its arrays exactly the config's."""
    cfg = _config_from(msg)
    policy.check_memory("the server's model", 16.0 * model_params(cfg))
    model = FedlvcCodec(cfg)
    try:
        if masked() and key == "arrays" and FITINS_ARRAYS in msg.content.array_records:  # SecAgg+'s FitIns layout
            state = positional_state_dict(msg.content[FITINS_ARRAYS], list(model.state_dict()))
        else:
            state = msg.content[key].to_torch_state_dict()
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as e:
        raise FedlvcError(f"the server's model arrays do not fit its model-config: {str(e)[:300]}") from None
    return model


def central_dp_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's client-side clipping of the model update when the server runs central (site-level) DP: the
    server's DP wrapper puts the clipping norm into the train config, our server says fixed or adaptive. Not
    under SecAgg+ (the run config refuses the combination: the server cannot clip what it cannot see)."""
    config = msg.content.config_records.get("config", {})
    if masked() or KEY_CLIPPING_NORM not in config:
        return call_next(msg, context)
    if config.get("central-dp") == "adaptive":
        return adaptiveclipping_mod(msg, context, call_next)
    return fixedclipping_mod(msg, context, call_next)


def _round(msg: Message) -> int:
    try:
        return int(_config(msg.content).get("server-round", 0))
    except (TypeError, ValueError):
        raise FedlvcError("the server's server-round is not a number") from None


def _reply(
    msg: Message,
    context: Context,
    metrics: dict,
    note: str = "",
    arrays: ArrayRecord | None = None,
    records: dict | None = None,
    **extra: str,
) -> Message:
    """A reply: metrics (numbers), the site's name and, when the site declined or refused, why; ``arrays`` (the
    trained model) or ``records`` (SecAgg+'s ``fitres.*``, masked by Flower's mod before they leave)."""
    name, _ = site_identity(context.node_config, context.node_id)
    content = {"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": name, "note": note, **extra})}
    if arrays is not None:
        content["arrays"] = arrays
    content.update(records or {})
    return Message(RecordDict(content), reply_to=msg)


# ----------------------------------------------------------------------------------------------- training


def _rounds(context: Context) -> ConfigRecord:
    """This run's bookkeeping of rounds: the latest round the site trained in (not one it declined or failed),
    and for each kind of release the trained round whose one answer it gave (at most one of each per round
    trained in)."""
    if "site-rounds" not in context.state:
        context.state["site-rounds"] = ConfigRecord({"train": 0, "eval": 0, "rd": 0, "compress": 0})
    return context.state["site-rounds"]


def training_bytes(rc: RunConfig, params: int) -> float:
    """Rough peak memory of a DP step: per-sample gradients (and their clipped copies) of every parameter,
    and the activations of a crop, for twice the expected Poisson batch, or for one piece of at most
    ``max-physical-batch`` rows (× frames per row)."""
    rows = 2.0 * rc.batch_size
    if rc.max_physical_batch:
        rows = min(rows, rc.max_physical_batch)
    return rows * max(rc.unit_frames, 1) * (8.0 * params + 400.0 * rc.crop_size**2)


# Coding memory, measured as the peak RSS growth of a process coding frames as the final compression does
# (encoder with its rate–distortion pass, decoder, PSNR) at 320×192 to 1280×768: per pixel and transform
# channel 4–7 bytes (v3, 64–512 channels), 9 (v4), 7 (adapters), 6 (motion), plus 20–90 MB; evaluation's
# MS-SSIM about 260 bytes per pixel of every held-out frame (float64 copies and filters of all at once).
# The constants round these up (10 bytes per channel, v4, adapters and motion counted as twice the channels).
CODING_BYTES_PER_PIXEL_CHANNEL = 10.0
CODING_FIXED_BYTES = 128 * 2**20
MEASURING_BYTES_PER_PIXEL = {True: 320.0, False: 32.0}  # per held-out pixel: with MS-SSIM, PSNR only


def coding_bytes(cfg: CodecConfig, height: int, width: int) -> float:
    """Rough peak memory of coding and decoding one frame of ``height`` × ``width`` pixels with a model of
    this config (padded to the stride), with working copies of the model's weights (8 bytes a parameter): a
    conservative estimate from the measurements above."""
    pixels = -(-height // cfg.stride) * cfg.stride * -(-width // cfg.stride) * cfg.stride
    channels = cfg.channels * (1 + cfg.hyper + cfg.adapters + cfg.motion)
    return CODING_BYTES_PER_PIXEL_CHANNEL * channels * pixels + 8.0 * model_params(cfg) + CODING_FIXED_BYTES


def measuring_bytes(cfg: CodecConfig, frames: list, with_ms_ssim: bool) -> float:
    """:func:`coding_bytes` of the largest of ``frames`` plus what measuring them all at once holds (decoded
    copies, PSNR, and MS-SSIM's filtered float64 copies): evaluation and ``query.rd``."""
    largest = max(frames, key=lambda f: f.shape[0] * f.shape[1])
    pixels = sum(f.shape[0] * f.shape[1] for f in frames)
    return coding_bytes(cfg, *largest.shape[:2]) + MEASURING_BYTES_PER_PIXEL[with_ms_ssim] * pixels


def personal_config(cfg: CodecConfig, rc: RunConfig) -> CodecConfig:
    """The config of the personal model a site makes from a model of ``cfg`` (adapters added when it tunes them)."""
    return dataclasses.replace(cfg, adapters=True) if rc.personal_parts == "adapters" else cfg


def _decide(plan, ledger, q: float, policy: SitePolicy, context: Context) -> str:
    """Why this round is declined ("" = it trains): the policy, a ledger on disk for real video, the budget."""
    if plan.declined:
        return plan.declined
    if policy.require_secure_aggregation and not masked():
        return (
            "the site's policy requires secure aggregation (require-secure-aggregation = true); this round is not "
            "run under SecAgg+"
        )
    if policy.real_video and state_dir_of(context.node_config) is None:
        return "a site with real video keeps its privacy ledger on disk: set state-dir in its node config"
    if plan.private:
        reach = plan.epsilon(ledger.history + [(plan.noise_multiplier, q, plan.steps)])
        if reach > plan.budget:
            return f"the round would take the site's epsilon to {reach:.3g}, past its budget {plan.budget:.3g}"
    return ""


def _train_round(model: FedlvcCodec, rows: list, rc: RunConfig, plan, policy: SitePolicy, q: float, seed: int):
    """Train the round the ledger has booked; returns the mean loss. Opacus must have counted exactly what the
    ledger booked."""
    dp = None
    if plan.private or rc.clip_only:
        dp = DPConfig(rc.noise_multiplier, rc.max_grad_norm, plan.delta, policy.accountant, rc.grad_sample_mode)
    result = local_train(model, rows, rc, dp, seed, _device())
    booked = (plan.noise_multiplier, q, plan.steps)
    if plan.private and [tuple(h) for h in result["history"]] != [booked]:
        raise RuntimeError(f"Opacus accounted {result['history']}, the ledger {booked}")
    return result["loss"]


TRAIN_MODS = [secure_aggregation_mod, central_dp_mod]  # outermost first; tests/fault_mod.py adds one inside


@app.train(mods=TRAIN_MODS)
def train(msg: Message, context: Context) -> Message:
    rc = RunConfig.from_mapping(context.run_config)
    policy = SitePolicy.of(context.node_config)
    name, number = site_identity(context.node_config, context.node_id)
    server_round = _round(msg)
    model = _model_from(msg, policy)
    received = {k: v.clone() for k, v in model.state_dict().items()} if masked() else None
    plan = policy.plan(rc)
    site = load_site(context.node_config, rc, policy, context.node_id)
    policy.check_memory("a training step", training_bytes(rc, model_params(model.cfg)))
    q = poisson_sample_rate(len(site.train_rows), rc.batch_size)
    # Decide and write what the round spends under the ledger's lock, before training: concurrent runs on one
    # state-dir serialise their spending, and a crash mid-round counts as spent.
    with open_ledger(context, rc, earlier_ledger(_config(msg.content), name)) as ledger:
        declined = _decide(plan, ledger, q, policy, context)
        if not declined:
            ledger.spend(plan.noise_multiplier if plan.private else 0.0, q, plan.steps)
            ledger.save(context, policy.accountant, policy.delta)
    seed = rc.seed + 1000 * server_round + number
    loss = None if declined else _train_round(model, site.train_rows, rc, plan, policy, q, seed)
    if not declined:  # only a round trained in unlocks the releases about it
        rounds = _rounds(context)
        rounds["train"] = max(int(rounds["train"]), server_round)
    metrics = {
        "num-examples": 0 if declined else len(site.train_rows),
        "epsilon": plan.epsilon(ledger.history),
        "delta": plan.delta,
        "noise_multiplier": rc.noise_multiplier,
        "max_grad_norm": rc.max_grad_norm,
        "sample_rate": q,
        "steps": 0 if declined else plan.steps,
        "declined": int(bool(declined)),
        "units": len(site.train_rows),  # privacy units (frames or segments) this site holds
        "unit-frames": rc.unit_frames,  # frames per privacy unit (1: frame; S: segment)
        **ledger.flat(),
    }
    if loss is not None and np.isfinite(loss) and policy.releases("train-loss"):
        metrics["train_loss"] = float(loss)
    accountant = ",".join(plan.accountants)
    if received is not None:  # SecAgg+: the update goes into the sum, masked; the model itself never leaves
        records = masked_update_records(model.state_dict(), received, contributes=not declined)
        return _reply(msg, context, metrics, note=declined, records=records, accountant=accountant)
    return _reply(msg, context, metrics, note=declined, arrays=ArrayRecord(model.state_dict()), accountant=accountant)


# ----------------------------------------------------------------------------- releases (not DP: the site's choice)


def _refusal(policy: SitePolicy, context: Context, kind: str, release: str, server_round: int) -> str:
    """Why the site does not answer this query ("" = it may; :func:`_book` it before coding): the policy's
    ``release`` list, and at most one answer of each kind per round of this run the site trained in, asked for
    that round or a later one (the server's final queries name the last round it asked the site to train in)."""
    if release and not policy.releases(release):
        allowed = ",".join(sorted(policy.release)) or "none"
        return f"the site's policy does not release {release} (release = {allowed})"
    rounds = _rounds(context)
    latest = int(rounds["train"])
    if latest == 0 or server_round < latest:
        return (
            f"{kind} is answered only for the site's latest training round ({latest or 'none in this run'}) or a "
            f"later one, not round {server_round}"
        )
    if int(rounds[kind]) == latest:
        return f"{kind} was answered already for training round {latest} (one for each round the site trained in)"
    return ""


def _book(context: Context, kind: str) -> None:
    """Spend the latest training round's one answer of ``kind`` (-1: the one compression of a run the site
    trained in no round of): before the model codes a private frame."""
    rounds = _rounds(context)
    rounds[kind] = int(rounds["train"]) or -1


def _compress_refusal(policy: SitePolicy, context: Context, server_round: int) -> tuple[str, bool]:
    """(why the site does not compress ("" = it does), whether it may release a summary). A site that trained in
    no round of this run still compresses its own video once, which is what it joined for, but releases nothing
    about it: only a round it trained in unlocks a release."""
    if int(_rounds(context)["train"]):
        return _refusal(policy, context, "compress", "", server_round), True
    return ("compress was answered already in this run" if int(_rounds(context)["compress"]) < 0 else ""), False


def _count_release(context: Context, release: str, policy: SitePolicy) -> None:
    """A site with a ledger on disk also counts its non-DP releases there, over all runs."""
    if state_dir_of(context.node_config) is None:
        return
    rc = RunConfig.from_mapping(context.run_config)
    with open_ledger(context, rc) as ledger:
        ledger.count_release(release)
        ledger.save(context, policy.accountant, policy.delta)


def _quality(model: FedlvcCodec, quality: int) -> int:
    if not 1 <= quality <= model.cfg.num_levels:
        raise FedlvcError(f"quality {quality} is not one of the model's levels 1..{model.cfg.num_levels}")
    return quality


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    rc = RunConfig.from_mapping(context.run_config)
    policy = SitePolicy.of(context.node_config)
    refused = _refusal(policy, context, "eval", "eval", _round(msg))
    if not refused:
        site = load_site(context.node_config, rc, policy, context.node_id)
        need = measuring_bytes(_config_from(msg), site.held_out, with_ms_ssim=True)
        refused = policy.memory_refusal("evaluating the held-out frames", need)
    if refused:
        return _reply(msg, context, {"refused": 1}, note=refused)
    _book(context, "eval")
    model = _model_from(msg, policy).eval()
    m = measure(model, np.stack(site.held_out), _quality(model, rc.eval_quality), rc)
    _count_release(context, "eval", policy)
    return _reply(
        msg, context, {"num-examples": len(site.held_out), "bpp": m["bpp"], "psnr": m["psnr"], "ms_ssim": m["ms_ssim"]}
    )


def _coding_model(model: FedlvcCodec, rc: RunConfig, policy: SitePolicy, context: Context, name: str, number: int):
    """(the model the site codes its own video with, a note): the received model, or with ``personal-steps`` the
    site's personal model fine-tuned from it on its training frames (kept at the site; :mod:`client.personal`)."""
    if not rc.personal_steps:
        return model, ""
    params = model_params(personal_config(model.cfg, rc))
    too_big = policy.memory_refusal("training the personal model", training_bytes(rc, params))
    if too_big:
        return model, f"no personal model: {too_big}"
    site = load_site(context.node_config, rc, policy, context.node_id)
    return personal_model(model, site.train_rows, rc, policy, context.node_config, name, personal_seed(rc, number))


@app.query("compress")
def compress(msg: Message, context: Context) -> Message:
    """Compress every clip of this site with the final global model into the site's own out-dir (never a
    path from the run config); reply with a summary if the site releases one and trained in a round of this run
    (:func:`_compress_refusal`)."""
    rc = RunConfig.from_mapping(context.run_config)
    policy = SitePolicy.of(context.node_config)
    refused, may_release = _compress_refusal(policy, context, _round(msg))
    if not refused:
        cfg = _config_from(msg)
        configs = {cfg, personal_config(cfg, rc)} if rc.personal_steps else {cfg}
        sizes = clip_frame_sizes(context.node_config, rc)
        need = max(coding_bytes(c, h, w) for c in configs for h, w in sizes)
        refused = policy.memory_refusal("compressing the site's clips", need)
    if refused:
        return _reply(msg, context, {"refused": 1}, note=refused)
    _book(context, "compress")
    name, number = site_identity(context.node_config, context.node_id)
    model, personal_note = _coding_model(_model_from(msg, policy).eval(), rc, policy, context, name, number)
    out = site_out_dir(context.node_config, name)
    out.mkdir(parents=True, exist_ok=True)
    quality = _quality(model, int(msg.content["config"].get("quality", rc.final_quality)))
    total_bytes, total_pixels, psnr_sum, frames_total = 0, 0, 0.0, 0
    for clip, frames, fps in site_clips(context.node_config, rc, context.node_id):
        path = out / f"{clip}.lvc"
        summary = encode_frames(frames(), path, model, quality, fps, coding_gop(model, rc), rule=rc.p_rule)
        _, decoded = decode_stream(path, model)
        for ref, dec in zip(frames(), decoded):  # stream both: the clip is never held in memory
            psnr_sum += psnr_rgb(ref, dec)
        total_bytes += summary["bytes"]
        total_pixels += summary["frames"] * summary["width"] * summary["height"]
        frames_total += summary["frames"]
    personal = {"personal": int(rc.personal_steps > 0 and not personal_note)}
    if not (may_release and policy.releases("compress-summary")):
        why = "the site does not release a summary" if may_release else "the site trained in no round of this run"
        return _reply(
            msg, context, {"compressed": 1}, note="; ".join(filter(None, [f"compressed; {why}", personal_note]))
        )
    _count_release(context, "compress-summary", policy)
    return _reply(
        msg,
        context,
        {
            "bytes": total_bytes,
            "frames": frames_total,
            "bpp": total_bytes * 8 / max(total_pixels, 1),
            "psnr": psnr_sum / max(frames_total, 1),
            "quality": quality,
            **personal,
        },
        note=personal_note,
    )


RD_MODELS = ("federated", "public")  # the models one query.rd may carry: what it is for, and a bound on work


def _rd_bytes(msg: Message, rc: RunConfig, site, names: list) -> float:
    """Memory of a ``query.rd``: the carried models (and a personal one) held at once, each measured in turn."""
    cfg = _config_from(msg)
    configs = [cfg, personal_config(cfg, rc)] if rc.personal_steps else [cfg]
    held = 4.0 * sum(model_params(c) for c in [cfg] * len(names) + configs[1:])
    return held + max(measuring_bytes(c, site.held_out, with_ms_ssim=False) for c in configs)


@app.query("rd")
def rd(msg: Message, context: Context) -> Message:
    """Rate–distortion of the models in the message (``federated`` and/or ``public`` arrays) on this site's
    held-out frames (never trained on): bpp and PSNR at every quality level, coded as in the final
    compression. Lets the server compare the federated model with the public one on each site's own video;
    only the curves come back, one query a round."""
    rc = RunConfig.from_mapping(context.run_config)
    policy = SitePolicy.of(context.node_config)
    refused = _refusal(policy, context, "rd", "rd", _round(msg))
    names = [k for k in RD_MODELS if k in msg.content.array_records]
    if not refused and not names:
        raise FedlvcError(f"query.rd carries none of the models {', '.join(RD_MODELS)}")
    if not refused:
        site = load_site(context.node_config, rc, policy, context.node_id)
        refused = policy.memory_refusal("measuring the models on the held-out frames", _rd_bytes(msg, rc, site, names))
    if refused:
        return _reply(msg, context, {"refused": 1}, note=refused)
    _book(context, "rd")
    frames = np.stack(site.held_out)
    metrics = {"frames": len(site.held_out)}
    models = {key: _model_from(msg, policy, key).eval() for key in names}
    note = ""
    if rc.personal_steps and "federated" in models:  # the site's personal model, from the federated one
        name, number = site_identity(context.node_config, context.node_id)
        personal, note = _coding_model(models["federated"], rc, policy, context, name, number)
        if not note:
            models["personal"] = personal
    for key, model in models.items():
        points = rd_points(model, frames, rc)
        metrics[f"bpp-{key}"] = [p["bpp"] for p in points]
        metrics[f"psnr-{key}"] = [p["psnr"] for p in points]
    _count_release(context, "rd", policy)
    return _reply(msg, context, metrics, note=note)
