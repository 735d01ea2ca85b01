"""Encoder-side rate–distortion choice of a P-frame's integer latent. The decoder needs none of it: it decodes
whatever integers the encoder chose."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.config.options import PFrameRule
from common.net.hyperprior import GDN
from common.net.model import FedlvcCodec
from common.net.temporal import (
    MAX_LAPLACE_BITS,
    MotionHistory,
    PFrameContexts,
    laplace_bit_tables,
    laplace_bits,
    p_context,
)


@torch.no_grad()
def choose_p_latent(
    y: torch.Tensor,
    prev: torch.Tensor,
    history: MotionHistory | None,
    raw: torch.Tensor,
    groups: int,
    rule: PFrameRule,
    support: int,
    lam: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    base: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the integer latent (B, C, h, w) (float) an encoder codes for the P-frame latent ``y`` on top of the
    previous decoded latent ``prev`` (see :class:`PFrameRule`), the context indices (B, C, h, w) it is coded
    under). ``raw``: the temporal prior's raw scales (B, C, K); ``lam`` (B,) the λ of each row's level and
    ``weights`` (B, C) its channel sensitivities (both only for rate–distortion optimisation). ``base``: the
    contexts before the in-frame value when they are not the temporal ones of ``prev`` (a motion model's residual
    latent)."""
    r = torch.round(y).clamp(-support, support)
    if not rule.uses_rd:
        if rule.skip_threshold > 0:
            r = torch.where((y - prev).abs() < 0.5 + rule.skip_threshold, prev, r)
        return r, p_context(prev, history, r, groups, base)
    return _rd_choice(y, prev, history, raw, groups, rule, r, lam, weights, base)


def _rd_choice(y, prev, history, raw, groups: int, rule: PFrameRule, r, lam, weights, base):
    """:func:`choose_p_latent` with rate–distortion optimisation, from the rounded latent ``r``: channel group
    by channel group, each element the cheapest of the previous value, ``r`` and ``r`` one step towards it."""
    towards = torch.where((r - prev).abs() >= 2, r - torch.sign(r - prev), r)
    dist = (rule.rd_weight * 255.0**2 / 3.0) * (lam[:, None] * weights)[:, :, None, None]
    # Per (row, channel, context): the bits of the previous value, the constant part of the bits of any
    # other value, and 1/(scale·ln 2) — tabulated once, gathered per element below.
    tables = laplace_bit_tables(raw)
    contexts = PFrameContexts(prev, history, groups, base)
    out = torch.empty_like(r)
    ctx_all = torch.empty_like(contexts.base)
    for g, sl in enumerate(contexts.slices):
        ctx = contexts.of(g)
        ctx_all[:, sl] = ctx
        zero, step, per_step = (torch.gather(t[:, sl], 2, ctx.flatten(2)).view_as(ctx) for t in tables)
        ys, ps, d = y[:, sl], prev[:, sl], dist[:, sl]
        best, best_cost = ps, d * (ys - ps) ** 2 + zero.clamp_max(MAX_LAPLACE_BITS)
        for cand in (r[:, sl], towards[:, sl]):
            cost = d * (ys - cand) ** 2 + laplace_bits(zero, step, per_step, (cand - ps).abs())
            better = cost < best_cost
            best, best_cost = torch.where(better, cand, best), torch.where(better, cost, best_cost)
        out[:, sl] = best
        contexts.add(g, best)
    return out, ctx_all


def hook_free(transform: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``transform(x)`` with detached weights and without calling any module, so that no hook (Opacus' per-sample
    gradient capture) sees the pass."""
    film = getattr(transform, "film", None) or {}
    for i, m in enumerate(transform.layers):
        if isinstance(m, nn.Conv2d):
            x = F.conv2d(x, m.weight.detach(), None if m.bias is None else m.bias.detach(), m.stride, m.padding)
        elif isinstance(m, nn.PixelShuffle):
            x = F.pixel_shuffle(x, m.upscale_factor)
        elif isinstance(m, nn.LeakyReLU):
            x = F.leaky_relu(x, m.negative_slope)
        elif isinstance(m, GDN):
            x = m.detached(x)
        else:
            raise TypeError(f"unexpected layer {m!r}")
        if str(i) in film:
            f = film[str(i)]
            x = F.conv2d(x, f.weight.detach(), f.bias.detach(), groups=f.groups)
    return x


def synthesis_sensitivity(
    model: FedlvcCodec,
    y_hat: torch.Tensor,
    levels: torch.Tensor,
    probes: int = 1,
    seed: int = 0,
    residual: bool = False,
) -> torch.Tensor:
    """(B, C) float32: for each row and latent channel, the mean over positions of the squared error of the
    decoded frame (RGB in [0, 1], summed over pixels and colours) per unit² change of one element of the
    scaled latent ``y_hat`` (B, C, h, w), i.e. the squared norm of that Jacobian column at ``y_hat``.
    Estimated with Hutchinson's trick — for a random ±1 vector r, E[(Jᵀr)²] is the squared column norm —
    so one backward pass serves every channel and position (``probes`` passes are averaged; the probes
    are fixed by ``seed`` and the same for every row). Runs the synthesis transform's layers without
    calling its modules, so Opacus' per-sample gradient hooks never see it. Used by the encoder's
    rate–distortion optimisation (on each group's I-frame), and by training, which models it on each row's
    own I-frame; the decoder never needs it. ``residual``: of a motion model's residual synthesis instead."""
    g_s, gains = (model.res_g_s, model.res_inv_gain) if residual else (model.g_s, model.inv_gain)
    inv_gain = torch.exp(gains.log_gain.weight.detach()[levels])[:, :, None, None]
    gen = torch.Generator(device=y_hat.device).manual_seed(seed)
    with torch.enable_grad():
        y = y_hat.detach().float().clone().requires_grad_(True)
        x = hook_free(g_s, y * inv_gain)
        acc = torch.zeros(y.shape[:2], device=y.device)
        for p in range(probes):
            # One probe for every row: a row's estimate depends on that row alone, whatever the batch.
            r = (torch.randint(0, 2, (1, *x.shape[1:]), generator=gen, device=x.device).float() * 2 - 1).expand_as(x)
            # Jᵀr as the gradient of Σ x·r (the same numbers as grad_outputs=r: the seed gradient is 1·r), which
            # spares the first call torch's import of sympy for the shape checks of grad_outputs (about a second)
            (grad,) = torch.autograd.grad((x * r).sum(), y, retain_graph=p < probes - 1)
            acc += grad.pow(2).mean((2, 3))
    return acc / probes
