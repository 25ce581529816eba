"""Callbacks, run records and W&B plumbing."""
