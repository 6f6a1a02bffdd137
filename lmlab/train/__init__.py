"""A dataset dir becomes a run dir: the optimizer step, the loop and its time budget, checkpoints and resume,
torchrun, fine-tuning, tracking."""
