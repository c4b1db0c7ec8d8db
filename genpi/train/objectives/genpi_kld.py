"""``genpi-kld`` (beyond the paper): the paper's joint loss with its SFT term distilled token by
token, ``(1 - λ) · (L_SFT + w · KL) + λ · L_PG``.

KL is seqkd-kld's term: from the teacher's next-token distribution (the base model with the
prompt, adapter disabled, the prompt's KV cache computed once per run) to the student's, on the
SFT tokens. The PG term puts the prompt itself in the weights; the KL term carries what the
teacher would have said besides the token it sampled.
"""

from __future__ import annotations

from typing import Any

import torch

from genpi.train.examples import RecordExamples
from genpi.train.objectives.base import FromTeacherViews, register_objective
from genpi.train.objectives.genpi import GenPI
from genpi.train.objectives.seqkd_kld import distilled_sums


@register_objective("genpi-kld")
class GenPIKLD(FromTeacherViews, GenPI):
    def sft_term(
        self, model: Any, records: list[RecordExamples], pad_id: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        distilled = [e for e in records if e.teacher is not None]
        alone = [e for e in records if e.teacher is None]  # the teacher view did not fit: SFT only
        zero = torch.zeros((), device=next(model.parameters()).device)
        ce, kl = distilled_sums(model, self.prefix, distilled, pad_id) if distilled else (zero, zero)
        if alone:
            ce = ce + super().sft_term(model, alone, pad_id)[0]
        return ce + self.cfg.kl_weight * kl, {"sft_loss": ce.detach(), "kl_loss": kl.detach()}
