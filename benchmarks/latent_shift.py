#!/usr/bin/env python
"""Why motion is compensated on pixels, not on latents (issue 16's design choice, common/motion/residual.py).

A camera pan of d pixels: the latent of the shifted view, against (a) the previous latent where it is (what a
latent P-frame predicts from) and (b) the previous latent shifted by d/16 latent pixels, interpolated linearly
(what motion in latent space would predict). For every d, the mean absolute difference in quantization steps
and the share of elements predicted exactly, over the interior of the latent, for the first frame of each real
clip (windows of 256x128 panned horizontally). At the transforms' stride of 16 only whole multiples of 16
pixels are predicted well by shifting the latent. Prints one JSON line.

    python benchmarks/latent_shift.py [--clips bikes,carphone] [--quality 4] [--model CKPT]
"""

from __future__ import annotations

import argparse

import _common as C
import numpy as np

SHIFTS = (1, 2, 4, 8, 12, 16)


def shifted_latent(y, d: int):
    """The latent y (C, h, w) moved left by d/16 latent pixels, linear between neighbours (edges repeated)."""
    import numpy as np

    s = d / 16
    i0 = int(np.floor(s))
    f = s - i0
    w = y.shape[-1]
    idx0, idx1 = np.clip(np.arange(w) + i0, 0, w - 1), np.clip(np.arange(w) + i0 + 1, 0, w - 1)
    return (1 - f) * y[:, :, idx0] + f * y[:, :, idx1]


def measure(frame, model, quality: int) -> list[dict]:
    import numpy as np
    import torch

    levels = torch.tensor([quality - 1])
    h, width = 128, 256

    def latent(x0: int):
        crop = np.ascontiguousarray(frame[:h, x0 : x0 + width])
        x = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad():
            return torch.round(model.analysis(x, levels))[0]

    y0 = latent(0)
    rows = []
    for d in SHIFTS:
        yd = latent(d)
        zero = (yd - y0)[:, 1:-1, 1:-2].abs()
        moved = (yd - torch.round(shifted_latent(y0, d)))[:, 1:-1, 1:-2].abs()
        rows.append(
            {
                "shift_px": d,
                "zero_motion_mae": float(zero.mean()),
                "zero_motion_exact": float((zero == 0).float().mean()),
                "latent_shift_mae": float(moved.mean()),
                "latent_shift_exact": float((moved == 0).float().mean()),
            }
        )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", default="bikes,carphone")
    ap.add_argument("--quality", type=int, default=4)
    ap.add_argument("--model", help="checkpoint (.safetensors); default: the shipped model")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    with C.json_stdout() as emit:
        C.set_threads(args.threads)
        model = C.load_model(args.model)
        clips = {}
        for name in args.clips.split(","):
            frames, _, source = C.load_clip(name, 1)
            frame = frames[0]
            if frame.shape[1] < 256 + 16 or frame.shape[0] < 128:  # a small clip: upscaled 2x to hold the windows
                from PIL import Image

                frame = np.asarray(
                    Image.fromarray(frame).resize((2 * frame.shape[1], 2 * frame.shape[0]), Image.BICUBIC)
                )
            clips[name] = {"source": source, "shifts": measure(frame, model, args.quality)}
        emit(
            {
                "benchmark": "latent_shift",
                "quality": args.quality,
                "clips": clips,
                **C.model_info(args.model, model),
                "hardware": C.hardware(),
            }
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
