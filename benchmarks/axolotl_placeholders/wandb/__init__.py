"""Placeholder for `wandb` in the GPU suite's `axolotl train` step only (see ../README.md): no W&B logging."""
run = None
