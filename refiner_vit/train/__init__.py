"""Training: engine, losses, checkpoints, distributed helpers."""
