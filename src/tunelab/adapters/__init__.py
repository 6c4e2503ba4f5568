"""Adapter merging, multi-task adapters and routing between them."""
