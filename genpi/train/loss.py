"""The joint GenPI loss.

``L = (1 - pg_lambda) * L_SFT + pg_lambda * L_PG``, each term the mean cross-entropy over the
label tokens of the whole optimizer step (not a mean of micro-batch means), so the loss and its
gradient do not depend on how a step is split into micro-batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from genpi.train.examples import IGNORE, Example


def summed_token_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token cross-entropy over the label tokens of a right-padded batch.

    No attention mask is passed: with right padding, causal attention never lets a real token
    see the pads after it, and pads carry no label. Without a mask, SDPA takes its fused causal
    kernel instead of materializing a full mask, about twice as fast on CPU.
    """
    logits = model(input_ids=batch["input_ids"]).logits
    shifted = batch["labels"][:, 1:]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), shifted.flatten(), ignore_index=IGNORE,
                           reduction="sum")


def label_tokens(examples: list[Example]) -> int:
    """Tokens that carry loss in ``examples`` (labels shifted by one, as in the loss)."""
    return sum(sum(label != IGNORE for label in e.labels[1:]) for e in examples)


def joint_loss(sft_sum: torch.Tensor, sft_tokens: int, pg_sum: torch.Tensor, pg_tokens: int,
               pg_lambda: float) -> torch.Tensor:
    """Combine summed SFT and PG losses of a step, given each term's label-token count for the step."""
    loss = torch.zeros((), device=sft_sum.device)
    if sft_tokens:
        loss = loss + (1 - pg_lambda) * sft_sum / sft_tokens
    if pg_tokens:
        loss = loss + pg_lambda * pg_sum / pg_tokens
    return loss
