"""Training: the loop, checkpoints, distributed helpers."""
