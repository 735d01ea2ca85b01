"""What a site measures of a model on its frames: real bpp (the bytes of a .lvc coded as the final compression
codes it) and PSNR / MS-SSIM of the decoded frames, at one quality (``evaluate``) or at every quality
(``query.rd``). Plain functions: the ClientApp and ``simulations.measure_setting`` use the same ones."""

from __future__ import annotations

import numpy as np

from common.config.fedconfig import RunConfig
from common.eval.evaluate import code_and_measure
from common.eval.metrics import ms_ssim
from common.net.model import FedlvcCodec


def coding_gop(model: FedlvcCodec, rc: RunConfig) -> int:
    """The group length a site codes with: the run's gop, 1 for an intra-only model."""
    return rc.gop if model.cfg.temporal else 1


def measure(model: FedlvcCodec, frames: np.ndarray, quality: int, rc: RunConfig, with_ms_ssim: bool = True) -> dict:
    """Real bpp (file bytes of a .lvc, coded as the final compression is) and PSNR / MS-SSIM of the decoded
    frames."""
    m, _ = code_and_measure(
        frames, model, quality, 25, coding_gop(model, rc), rc.p_rule, ms_ssim if with_ms_ssim else None
    )
    return {"bpp": m["summary"]["bpp"], "psnr": m["psnr"], "ms_ssim": m["ms_ssim"]}


def rd_points(model: FedlvcCodec, frames: np.ndarray, rc: RunConfig) -> list[dict]:
    """:func:`measure` (without MS-SSIM) at every quality level of ``model``: one model's curve in ``query.rd``."""
    return [measure(model, frames, q, rc, with_ms_ssim=False) for q in range(1, model.cfg.num_levels + 1)]
