"""Measurement: PSNR-RGB, MS-SSIM and BD-rate, and the codec measured end to end against x264/x265 on the same
frames (encode → decode → measure, ``fedlvc evaluate``'s curves, plots and grid). On top of ``common.codec``."""
