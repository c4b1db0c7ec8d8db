"""Adapter training: examples, the joint loss, the training loop, the per-prompt stage."""
