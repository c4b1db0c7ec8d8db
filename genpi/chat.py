"""Chat messages as token ids: the one place a conversation meets a tokenizer's chat template.

Engines, training and evaluation all render conversations here, so they see the same ids; the
shared-prefix and context-length rules live here too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Message = dict[str, str]
Conversation = list[Message]

DEFAULT_CONTEXT = 2048  # what a model config without max_position_embeddings is taken to allow


MIN_SHARED_PREFIX = 32  # tokens below which a separate prefill pass costs more than it saves


def chat_ids(tokenizer: Any, messages: Conversation, generation_prompt: bool = False) -> list[int]:
    """Token ids of ``messages`` rendered with the model's chat template (plus the assistant's
    generation header when ``generation_prompt``)."""
    return list(
        tokenizer.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, tokenize=True, return_dict=True
        )["input_ids"]
    )


def request_ids(tokenizer: Any, conversation: Conversation) -> list[int]:
    """Token ids an engine generates after: the conversation and the assistant's generation header.

    A conversation that ends with an assistant message is a prefilled answer: the reply continues
    that message (no end of turn after it, no new header); like every reply, it comes stripped."""
    prefilled = bool(conversation) and conversation[-1]["role"] == "assistant"
    return list(
        tokenizer.apply_chat_template(
            conversation,
            add_generation_prompt=not prefilled,
            continue_final_message=prefilled,
            tokenize=True,
            return_dict=True,
        )["input_ids"]
    )


def common_prefix(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the prefix that every sequence starts with (0 for no sequences)."""
    if not sequences:
        return 0
    first, shortest = sequences[0], min(len(s) for s in sequences)
    return next((k for k in range(shortest) if any(s[k] != first[k] for s in sequences)), shortest)


def shared_opening(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the opening every sequence shares (the prompt) that is worth computing once for
    all: at least one token of each stays to compute after it, and 0 for fewer than two sequences
    or an opening shorter than :data:`MIN_SHARED_PREFIX`."""
    if len(sequences) < 2:
        return 0
    length = min(common_prefix(sequences), min(len(s) for s in sequences) - 1)
    return length if length >= MIN_SHARED_PREFIX else 0


def context_length(config: Any, default: int = DEFAULT_CONTEXT) -> int:
    """A model's context length from its config (a transformers config, a dict, or a model folder)."""
    if isinstance(config, (str, Path)):
        config = json.loads((Path(config) / "config.json").read_text())
    value = (
        config.get("max_position_embeddings")
        if isinstance(config, dict)
        else getattr(config, "max_position_embeddings", None)
    )
    return int(value) if value else default
