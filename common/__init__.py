"""Shared core of fedlvc: model, entropy coding, bitstream, video I/O, metrics, baselines, training."""

__version__ = "0.1.0"
