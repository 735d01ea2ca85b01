"""Training: the one training loop (single site and a federated round), the training path of groups of
pictures, the rate–distortion losses, and the DP-SGD wiring (Opacus) with its accounting."""
