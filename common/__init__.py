"""Shared core of fedlvc, in packages that import only downward (``lint-imports`` checks it; pyproject.toml's
``[tool.importlinter]``): ``config`` (settings), ``data`` (video I/O, generated and public data) and ``net`` (the
float model), ``coding`` (P-frame choice, entropy coding, bitstream), ``motion`` (motion-compensated P-frames) and
``checkpoint``, then ``codec`` (whole videos) and ``train`` (the loop, DP), then ``eval`` (measurement)."""

__version__ = "0.1.0"
