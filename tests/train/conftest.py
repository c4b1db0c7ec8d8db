"""Fixtures of the training tests: the tiny model's tokenizer and a float32 LoRA model."""

from __future__ import annotations

import pytest
import torch

from genpi.models import TINY, resolve_model
from genpi.train.trainer import load_for_training
from tests.train.tiny import tcfg


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(TINY))


@pytest.fixture(scope="module")
def lora_model():
    """Tiny model in float32 with a seeded LoRA whose B matrices are made non-zero (so LoRA matters)."""
    torch.set_num_threads(2)
    model, tok = load_for_training(tcfg(), TINY, "float32")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.eval()
    return model, tok
