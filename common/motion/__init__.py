"""Motion-compensated P-frames (model config ``motion``): block motion on the previous decoded frame (exact integer
prediction, bounded search, the vectors' predictor and counts) and the residual codec's training path and coding.
Built on ``common.coding`` and ``common.net``."""
