"""Training: loss, optimizer and frozen parts, the sharded train step, checkpoints, metrics."""
