"""Token losses shared by the objectives.

Every term is a *sum* over the label tokens of a micro-batch; an objective divides by the
label-token count of the whole optimizer step, so a step's loss and gradient do not depend on
how it is split into micro-batches. Logits are computed only where a label is predicted (the
LM head is skipped at masked positions) and upcast to float32 only there.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from genpi.train.examples import IGNORE, Example


def label_logits(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], cache: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits that predict each label token of a right-padded batch, ``[n, vocab]``, and
    those ``n`` labels, row by row in order. With ``cache`` (one row per batch row),
    the batch continues the tokens that cache holds.

    No attention mask is passed: with right padding, causal attention never lets a real token
    see the pads after it, and pads carry no label. Without a mask, SDPA takes its fused causal
    kernel instead of materializing a full mask, about twice as fast on CPU.
    """
    labels = batch["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    logits = model(
        input_ids=batch["input_ids"],
        logits_to_keep=keep,
        cache=cache,
        use_cache=cache is not None,
    ).logits
    return logits, labels[:, 1:][keep[:, :-1]]


def summed_token_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token cross-entropy over the label tokens of a right-padded batch."""
    logits, targets = label_logits(model, batch)
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def summed_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Sum over positions of KL(teacher || student) over the full vocabulary (``[n, vocab]`` each)."""
    teacher = F.log_softmax(teacher_logits.float(), dim=-1)
    student = F.log_softmax(student_logits.float(), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="sum")


def label_tokens(examples: list[Example]) -> int:
    """Tokens that carry loss in ``examples`` (labels shifted by one, as in the loss)."""
    return sum(sum(label != IGNORE for label in e.labels[1:]) for e in examples)


def joint_loss(
    sft_sum: torch.Tensor, sft_tokens: int, pg_sum: torch.Tensor, pg_tokens: int, pg_lambda: float
) -> torch.Tensor:
    """``(1 - pg_lambda) * L_SFT + pg_lambda * L_PG`` from summed losses and each term's label-token
    count for the whole step."""
    loss = torch.zeros((), device=sft_sum.device)
    if sft_tokens:
        loss = loss + (1 - pg_lambda) * sft_sum / sft_tokens
    if pg_tokens and pg_lambda:
        loss = loss + pg_lambda * pg_sum / pg_tokens
    return loss
