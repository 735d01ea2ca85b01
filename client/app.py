"""The fedlvc Flower ClientApp: DP local training, federated evaluation, and the final compression of the
site's own video. Replies carry the model's arrays and scalar metrics only; frames stay at the site."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from common.codec import decode_stream, encode_frames
from common.fedconfig import RunConfig
from common.metrics import ms_ssim, psnr_rgb
from common.model import CodecConfig, FedlvcCodec, PFrameRule
from common.privacy import DPConfig, poisson_sample_rate
from common.training import local_train

from .site import PrivacyLedger, earlier_ledger, load_site, site_clips, site_identity

app = ClientApp()


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _model_from(msg: Message) -> FedlvcCodec:
    cfg = CodecConfig.from_dict(json.loads(msg.content["config"]["model-config"]))
    model = FedlvcCodec(cfg)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model


FAULT_ENV = "FEDLVC_INJECT_FAULT"  # testing aid: "<site id>:<round>" makes that site crash in that round
HANG_ENV = "FEDLVC_INJECT_HANG"  # testing aid: "<site id>:<round>:<seconds>" makes that site stall


def _inject_fault(site_id: int, server_round: int) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if spec and spec == f"{site_id}:{server_round}":
        raise RuntimeError(f"fault injected by {FAULT_ENV}={spec}")
    hang = os.environ.get(HANG_ENV, "").split(":")
    if len(hang) == 3 and hang[:2] == [str(site_id), str(server_round)]:
        time.sleep(float(hang[2]))


def central_dp_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's client-side clipping of the model update when the server runs central (site-level) DP: the
    server's DP wrapper puts the clipping norm into the train config, our server says fixed or adaptive."""
    config = msg.content["config"]
    if KEY_CLIPPING_NORM not in config:
        return call_next(msg, context)
    if config.get("central-dp") == "adaptive":
        return adaptiveclipping_mod(msg, context, call_next)
    return fixedclipping_mod(msg, context, call_next)


@app.train(mods=[central_dp_mod])
def train(msg: Message, context: Context) -> Message:
    rc = RunConfig.from_mapping(context.run_config)
    site = load_site(context.node_config, rc)
    _inject_fault(site.site_id, int(msg.content["config"].get("server-round", 0)))
    ledger = PrivacyLedger.load(context, rc, earlier_ledger(msg.content["config"], site.site_id))
    model = _model_from(msg)
    server_round = int(msg.content["config"].get("server-round", 0))
    q = poisson_sample_rate(len(site.train_rows), rc.batch_size)
    dp = None
    declined = False
    if rc.private or rc.clip_only:
        dp = DPConfig(rc.noise_multiplier, rc.max_grad_norm, rc.delta, rc.accountant, rc.grad_sample_mode)
    if rc.private:
        # Refuse before spending: the ε this round would reach, from the ledger plus the planned steps.
        declined = ledger.epsilon([(rc.noise_multiplier, q, rc.local_steps)]) > rc.epsilon_budget
    if declined:
        loss, steps = float("nan"), 0
    else:
        result = local_train(model, site.train_rows, rc.local_steps, rc.batch_size, rc.crop_size,
                             rc.learning_rate, dp=dp, history=ledger.history,
                             seed=rc.seed + 1000 * server_round + site.site_id, device=_device(),
                             segment_frames=rc.segment_frames if rc.privacy_unit == "segment" else 0,
                             rule=rc.p_rule, parts=rc.train_parts)
        loss, steps = result["loss"], result["steps"]
        if rc.private:
            ledger.history = [tuple(h) for h in result["history"]]
        else:  # a non-private round is recorded too: σ = 0 means ε = ∞ for this site's data from now on
            ledger.history.append((0.0, result["sample_rate"], steps))
        ledger.save(context)
    metrics = {
        "num-examples": 0 if declined else len(site.train_rows),
        "site_id": site.site_id,
        "train_loss": 0.0 if math.isnan(loss) else loss,
        "epsilon": ledger.epsilon(),
        "delta": rc.delta,
        "noise_multiplier": rc.noise_multiplier,
        "max_grad_norm": rc.max_grad_norm,
        "sample_rate": q,
        "steps": steps,
        "declined": int(declined),
        "units": len(site.train_rows),  # privacy units (frames or segments) this site holds
        "unit-frames": rc.unit_frames,  # frames per privacy unit (1: frame; S: segment)
        "site-weight": 1,  # equal weights: what central (site-level) DP averaging needs
        **ledger.flat(),
    }
    if not ledger.history:  # metric lists must not be empty: a site that never trained has spent nothing
        metrics.update(dp_sigma=[0.0], dp_sample_rate=[0.0], dp_steps=[0])
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)}),
                   reply_to=msg)


def _gop(model: FedlvcCodec, rc: RunConfig) -> int:
    return rc.gop if model.cfg.temporal else 1


def _measure(model: FedlvcCodec, frames: np.ndarray, quality: int, gop: int, rule: PFrameRule, fps=25,
             with_ms_ssim: bool = True) -> dict:
    """Real bpp (file bytes of a .lvc) and PSNR/MS-SSIM of decoded frames."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "eval.lvc"
        summary = encode_frames(iter(frames), path, model, quality, fps, gop, rule=rule)
        _, it = decode_stream(path, model)
        decoded = np.stack(list(it))
    return {"bpp": summary["bpp"], "psnr": psnr_rgb(frames, decoded),
            "ms_ssim": ms_ssim(frames, decoded) if with_ms_ssim else None,
            "bytes": summary["bytes"]}


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    rc = RunConfig.from_mapping(context.run_config)
    site = load_site(context.node_config, rc)
    model = _model_from(msg).eval()
    m = _measure(model, np.stack(site.held_out), rc.eval_quality, _gop(model, rc), rc.p_rule)
    metrics = {"num-examples": len(site.held_out), "site-weight": 1, "site_id": site.site_id, "bpp": m["bpp"],
               "psnr": m["psnr"], "ms_ssim": m["ms_ssim"]}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.query("compress")
def compress(msg: Message, context: Context) -> Message:
    """Compress every clip of this site with the final global model into its out-dir; reply with a summary."""
    rc = RunConfig.from_mapping(context.run_config)
    name, site_id = site_identity(context.node_config)
    model = _model_from(msg).eval()
    out_dir = str(context.node_config.get("out-dir", "") or "")
    out = Path(out_dir) if out_dir else rc.resolved_out_dir() / "sites" / name
    out.mkdir(parents=True, exist_ok=True)
    quality = int(msg.content["config"].get("quality", rc.final_quality))
    total_bytes, total_pixels, psnr_sum, frames_total = 0, 0, 0.0, 0
    for clip, frames, fps in site_clips(context.node_config, rc):
        path = out / f"{clip}.lvc"
        summary = encode_frames(frames(), path, model, quality, fps, _gop(model, rc), rule=rc.p_rule)
        _, decoded = decode_stream(path, model)
        for ref, dec in zip(frames(), decoded):  # stream both: the clip is never held in memory
            psnr_sum += psnr_rgb(ref, dec)
        total_bytes += summary["bytes"]
        total_pixels += summary["frames"] * summary["width"] * summary["height"]
        frames_total += summary["frames"]
    metrics = {"site_id": site_id, "bytes": total_bytes, "frames": frames_total,
               "bpp": total_bytes * 8 / max(total_pixels, 1), "psnr": psnr_sum / max(frames_total, 1),
               "quality": quality}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.query("rd")
def rd(msg: Message, context: Context) -> Message:
    """Rate–distortion of the model in the message on this site's held-out frames (never trained on): bpp and
    PSNR at every quality level, coded as in the final compression. Lets the server compare the federated
    model with the public one on each site's own video; only the two curves come back."""
    rc = RunConfig.from_mapping(context.run_config)
    site = load_site(context.node_config, rc)
    model = _model_from(msg).eval()
    frames = np.stack(site.held_out)
    bpp, psnr = [], []
    for quality in range(1, model.cfg.num_levels + 1):
        m = _measure(model, frames, quality, _gop(model, rc), rc.p_rule, with_ms_ssim=False)
        bpp.append(m["bpp"])
        psnr.append(m["psnr"])
    metrics = {"site_id": site.site_id, "frames": len(site.held_out), "bpp": bpp, "psnr": psnr}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
