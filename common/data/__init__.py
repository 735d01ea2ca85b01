"""Video and data: PyAV decoding, probing and atomic writing, x264/x265 on the same frames, generated sites (held or
streamed on demand), the public photo corpus and the clips made from it, and the crop datasets DP-SGD samples."""
