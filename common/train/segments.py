"""The training path of a group of pictures: rows of consecutive frames coded as the coder will code them, the
first as an I-frame, the others as P-frames whose integer latents the encoder's P-frame rule chooses (latent
P-frames here, a motion model's in :mod:`common.motion.residual`), so that the priors learn the statistics the coder
will see. Above the model: it runs the encoder's choices and the P-frame coders' training rates."""

from __future__ import annotations

import torch

from common.coding.entropy import LatentCoders
from common.coding.latent import Training
from common.coding.rdo import choose_p_latent, synthesis_sensitivity
from common.config.options import PFrameRule
from common.errors import FedlvcError
from common.motion.residual import forward_motion_segment
from common.net.model import FedlvcCodec
from common.net.temporal import next_history


def forward_segment(model: FedlvcCodec, x: torch.Tensor, levels: torch.Tensor, rule: PFrameRule = PFrameRule()) -> dict:
    """Training path for rows of consecutive frames x: (B, S, 3, H, W) coded as one group of pictures:
    frame 0 as an I-frame, the others as P-frames (rate under the temporal prior of the integer latent the
    encoder would code, around the previous one, as the coder will see it; straight-through gradient).
    ``rule`` is the encoder's P-frame quantization (:class:`PFrameRule`; rate–distortion optimisation
    measures each row's channel sensitivities on its own I-frame, as the encoder does per group), so the
    prior learns the statistics the coder will see. Returns x_hat (B, S, 3, H, W) and per-row bits (B,).

    Each module is called once: the transforms and gains on all B·S frames (rows b·S … b·S+S−1 belong
    to segment b), the priors on the B segments. Under DP-SGD the per-frame gradient samples are summed
    per segment by :func:`common.train.privacy.fold_segment_grad_samples` before clipping."""
    if not model.cfg.temporal:
        raise FedlvcError("this model has no temporal prior (intra-only architecture)")
    if model.cfg.motion:
        return forward_motion_segment(model, x, levels, rule)
    b, frames = x.shape[:2]
    flat = x.reshape(b * frames, *x.shape[2:]).contiguous()  # not channels_last: see common.train.privacy
    y = model.analysis(flat, levels.repeat_interleave(frames))
    yv = y.reshape(b, frames, *y.shape[1:])
    raw = model.temporal(levels)
    lam = torch.tensor(model.cfg.lambdas, dtype=y.dtype, device=y.device)[levels]
    targets, coded, contexts = _coded_latents(model, yv, levels, raw, lam, rule)
    if model.training:
        y_tilde = y + torch.empty_like(y).uniform_(-0.5, 0.5)
    else:
        y_tilde = torch.stack(targets, 1).reshape(y.shape)
    x_hat = model.synthesis(y_tilde, levels.repeat_interleave(frames))
    first = y_tilde.reshape(b, frames, *y.shape[1:])[:, 0]
    coders = LatentCoders(model)
    bits = coders.intra.training_bits(first, Training(levels))
    for s in range(1, frames):
        bits = bits + coders.p.training_bits(targets[s], Training(levels, raw, coded[s - 1], contexts[s]))
    return {"x_hat": x_hat.reshape(b, frames, *x_hat.shape[1:]), "bits": bits}


def _coded_latents(model: FedlvcCodec, yv: torch.Tensor, levels, raw, lam, rule: PFrameRule) -> tuple[list, list, list]:
    """(straight-through targets, the latents the coder will hold, the contexts each P-frame is coded under) of a
    segment's latents ``yv`` (B, S, C, h, w), frame by frame as the encoder chooses them (its P-frame rule),
    with the motion history of the group."""
    groups, support, weights = model.cfg.p_groups, model.cfg.support, None
    targets, coded, histories, contexts = [], [], [None], [None]
    for s in range(yv.shape[1]):
        ys = yv[:, s]
        if s == 0:
            q = torch.round(ys.detach())
            if rule.uses_rd:
                weights = synthesis_sensitivity(model, q, levels)
        else:
            if s >= 2:
                histories.append(next_history(histories[-1], coded[s - 2], coded[s - 1]))
            q, ctx = choose_p_latent(
                ys.detach(), coded[-1], histories[-1], raw.detach(), groups, rule, support, lam, weights
            )
            contexts.append(ctx)  # the contexts the choice was made under, which code it
        targets.append(ys + (q - ys).detach())
        coded.append(q)
    return targets, coded, contexts
