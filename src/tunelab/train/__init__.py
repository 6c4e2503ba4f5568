"""The training loop, one run end to end, checkpoints, optimizer and schedule, FLOPs and MFU."""
