"""``seqkd-kld``: SFT on the teacher's turns (sequence-level KD) plus, on the same tokens, the KL
from the teacher's next-token distribution with the prompt to the student's without it.

The teacher is the same base model with its adapter disabled, reading the teacher view (the
prompt, then the same turns): no second copy of the model is loaded, and the prompt's KV cache is
computed once per run (:mod:`genpi.train.teacher_prefix`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from genpi.train.batches import collate
from genpi.train.examples import RecordExamples
from genpi.train.loss import label_logits, label_tokens, summed_kl
from genpi.train.objectives.base import FromTeacherViews, register_objective
from genpi.train.teacher_prefix import TeacherPrefix


@register_objective("seqkd-kld")
class SeqKDKLD(FromTeacherViews):
    def select(self, step: list[RecordExamples], step_no: int) -> list[RecordExamples]:
        return [e if e.teacher is not None else RecordExamples(None, None) for e in step]

    def token_counts(self, step: list[RecordExamples]) -> dict[str, int]:
        return {"sft": label_tokens([e.sft for e in step if e.sft is not None])}

    def micro_loss(
        self, model: Any, micro: list[RecordExamples], counts: dict[str, int], pad_id: int
    ) -> tuple[torch.Tensor, dict[str, float]] | None:
        pairs = [e for e in micro if e.sft is not None and e.teacher is not None]
        if not pairs:
            return None
        ce, kl = distilled_sums(model, self.prefix, pairs, pad_id)
        n = counts["sft"]
        return (ce + self.cfg.kl_weight * kl) / n, {"sft_loss": ce.item() / n, "kl_loss": kl.item() / n}


def distilled_sums(
    model: Any, prefix: TeacherPrefix, records: list[RecordExamples], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of the records' SFT examples, and summed KL from the teacher's
    distributions (their teacher views) to the student's on the same tokens."""
    device = next(model.parameters()).device
    student_logits, targets = label_logits(model, collate([e.sft for e in records], pad_id, device))
    teacher_logits, teacher_targets = prefix.label_logits(model, [e.teacher for e in records], pad_id)
    if not torch.equal(targets, teacher_targets):
        raise ValueError("the student and teacher views label different tokens; their turns must match")
    return F.cross_entropy(student_logits.float(), targets, reduction="sum"), summed_kl(student_logits, teacher_logits)
