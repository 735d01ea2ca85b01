"""Coding: one interface for every latent coder (``latent``: training rate, fit, bits, compress, decompress side by
side), the factorized-prior I-frame coder and the payload with its check value (``entropy``), the P-frame coder
(``pframe``), v4's exact integer tables and I-frame coder (``hypercoder``), the encoder's choice of a P-frame's
integer latent (``rdo``) and the ``.lvc`` container (``bitstream``). Built on ``common.net``; knows nothing of files,
training or motion."""
