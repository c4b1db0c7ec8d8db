"""The teacher's next-token distributions, with the prompt's KV cache computed once per run.

Every teacher view of a prompt's examples opens with the same tokens: the prompt. The teacher is
the base model with the adapter disabled, whose weights never change during a run, so the KV
cache of that opening is the same at every step. It is computed once; each teacher forward then
reads only an example's own tokens (~300) instead of the prompt as well (~1,500 on the shipped
prompts), which is what makes a KL objective affordable on CPU.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch

from genpi.chat import common_prefix
from genpi.train.batches import collate
from genpi.train.examples import IGNORE, Example
from genpi.train.loss import label_logits

MIN_SHARED = 32  # below this many shared tokens a cache saves less than it costs to copy


def shared_opening(examples: list[Example]) -> int:
    """How many leading tokens every example shares, up to one before any example's first label
    (the position that predicts a label is read with the example's own tokens)."""
    if not examples:
        return 0
    common = common_prefix([e.input_ids for e in examples])
    first_label = min(next((k for k, x in enumerate(e.labels) if x != IGNORE), len(e.labels)) for e in examples)
    return max(0, min(common, first_label - 1))


class TeacherPrefix:
    """The KV cache of the opening every teacher view shares, and the teacher's logits from it."""

    def __init__(self, model: Any, examples: list[Example]) -> None:
        length = shared_opening(examples)
        self.tokens: list[int] = examples[0].input_ids[:length] if length >= MIN_SHARED else []
        self.cache: Any = None
        if self.tokens:
            from transformers.cache_utils import DynamicCache

            self.cache = DynamicCache(config=model.config)
            with _teacher(model):
                model(
                    input_ids=torch.tensor([self.tokens], device=model.device),
                    cache=self.cache,
                    use_cache=True,
                )

    def label_logits(self, model: Any, examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`genpi.train.loss.label_logits` of the teacher (adapter disabled, no gradient) on
        ``examples``; the shared opening is read from the cache when every example starts with it."""
        n = len(self.tokens)
        with _teacher(model):
            if not n or any(e.input_ids[:n] != self.tokens for e in examples):
                return label_logits(model, collate(examples, pad_id, model.device))
            cache = copy.deepcopy(self.cache)
            if len(examples) > 1:
                cache.batch_repeat_interleave(len(examples))
            rest = [Example(e.input_ids[n:], e.labels[n:]) for e in examples]
            return label_logits(model, collate(rest, pad_id, model.device), cache=cache)


@contextlib.contextmanager
def _teacher(model: Any) -> Iterator[None]:
    """The base model as the teacher: adapter disabled, no gradient, eval mode (gradient
    checkpointing would refuse a cache); the training mode is restored after."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), model.disable_adapter():
            yield
    finally:
        model.train(training)
