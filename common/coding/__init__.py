"""Coding: the encoder's choice of a P-frame's integer latent, the P-frame coder (training rate and ANS side by
side), v4's exact integer tables and I-frame coder, the latent coder with its payload check, and the ``.lvc``
container. Built on ``common.net``; knows nothing of files, training or motion."""
