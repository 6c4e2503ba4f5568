"""The training loop, checkpoints, optimizer and schedule, hardware accounting."""
