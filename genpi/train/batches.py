"""Examples to model-ready tensors."""

from __future__ import annotations

import torch

from genpi.train.examples import IGNORE, Example


def collate(examples: list[Example], pad_id: int, device: torch.device | str) -> dict[str, torch.Tensor]:
    """Right-padded tensors; padding carries no loss (the mask is for callers that need one)."""
    width = max(len(e.input_ids) for e in examples)
    ids = [e.input_ids + [pad_id] * (width - len(e.input_ids)) for e in examples]
    labels = [e.labels + [IGNORE] * (width - len(e.labels)) for e in examples]
    mask = [[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in examples]
    return {
        "input_ids": torch.tensor(ids, device=device),
        "labels": torch.tensor(labels, device=device),
        "attention_mask": torch.tensor(mask, device=device),
    }
