#!/usr/bin/env python
"""Where a static camera's P-frame bits go: inside the regions that moved, or on the still background.

Codes a generated static-camera clip (default: site 4, which the shipped model never trained on) as one
group of pictures with ``fedlvc compress``'s P-frame rule and splits every P-frame's ideal
bits (−log2 p under the temporal prior, per latent element) between "moving" latent pixels — those whose
16×16 source block changed by more than ``--threshold`` grey levels against the previous frame somewhere,
dilated by one latent pixel — and the rest. Prints one JSON line per quality.

    python benchmarks/p_frame_bits.py [--clip static] [--frames 30] [--qualities 1,4,6] [--model CKPT]
"""

from __future__ import annotations

import argparse

import _common as C


def split_bits(frames, model, quality: int, threshold: int) -> dict:
    import numpy as np
    import torch

    from common.codec import DEFAULT_P_RULE, FrameEncoder
    from common.net.temporal import laplace_likelihood

    encoder = FrameEncoder(model, quality, track_bits=True, gop=len(frames), rule=DEFAULT_P_RULE)
    stride = model.cfg.stride
    moving_bits = still_bits = moving_area = 0.0
    for t, frame in enumerate(frames):
        if t == 0:
            encoder.encode(frame)
            i_bits = encoder.ideal_bits
            continue
        condition = encoder.state.condition(quality - 1)
        encoder.encode(frame)
        means, scales = encoder.coders.p.fit(encoder.state.prev, condition)[1]
        y = encoder.state.prev.reshape(-1).astype(np.float64)
        p = laplace_likelihood(*(torch.from_numpy(a) for a in (y, means, scales))).numpy()
        bits = -np.log2(np.maximum(p, 2.0**-24)).reshape(encoder.state.prev.shape)
        h, w = bits.shape[1:]
        change = np.abs(frame.astype(int) - frames[t - 1].astype(int)).max(2)
        change = np.pad(change, ((0, h * stride - change.shape[0]), (0, w * stride - change.shape[1])))
        moved = (change.reshape(h, stride, w, stride) > threshold).any((1, 3))
        padded = np.pad(moved, 1)
        moved = np.max(np.stack([padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)]), 0)
        moving_bits += bits[:, moved].sum()
        still_bits += bits[:, ~moved].sum()
        moving_area += moved.mean()
    n = len(frames) - 1
    return {
        "quality": quality,
        "i_frame_bits": i_bits,
        "p_frame_bits": (moving_bits + still_bits) / n,
        "p_bits_in_moving_regions": moving_bits / n,
        "p_bits_elsewhere": still_bits / n,
        "moving_share_of_p_bits": moving_bits / (moving_bits + still_bits),
        "moving_area": moving_area / n,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clip", default="static")
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--qualities", default="1,4,6")
    ap.add_argument("--threshold", type=int, default=25, help="grey levels of change that count as motion")
    ap.add_argument("--model", help="checkpoint (.safetensors); default: the shipped model")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    with C.json_stdout() as emit:
        C.set_threads(args.threads)
        model = C.load_model(args.model)
        frames, _, source = C.load_clip(args.clip, args.frames)
        rows = [split_bits(frames, model, int(q), args.threshold) for q in args.qualities.split(",")]
        emit(
            {
                "benchmark": "p_frame_bits",
                "source": source,
                "threshold": args.threshold,
                "qualities": rows,
                **C.model_info(args.model, model),
                "hardware": C.hardware(),
            }
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
