"""Training: trainer, step, optimizer and schedule, checkpoints, metrics."""
