"""``onpolicy-kl``: on-policy context distillation (beyond the paper; arXiv 2602.12275).

After a warm start of SFT steps (``onpolicy_warmup`` of the run), each step the adapter samples
its own first reply to each record's input without the prompt, and learns to minimize, on every
token of its sample, the reverse KL (its top-k tokens plus a tail bucket) from its own
next-token distribution to the same model's with the prompt (adapter disabled). Only the
sampled reply carries loss (single-turn samples: no environment tokens).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F

from genpi.divergence import topk_tail_kl
from genpi.train.batches import collate
from genpi.train.examples import IGNORE, Example, RecordExamples
from genpi.train.loss import label_logits, label_tokens
from genpi.train.objectives.base import FromTeacherViews, register_objective
from genpi.train.objectives.genpi import SFT


@dataclasses.dataclass
class Sampled(RecordExamples):
    """A record's on-policy sample: ``sft`` is the student view of it, ``teacher`` the teacher view."""


@register_objective("onpolicy-kl")
class OnPolicyKL(FromTeacherViews, SFT):
    def views(self, examples: list[RecordExamples]) -> list[Example]:
        # the teacher reads each opening followed by a sample: the openings hold the shared prompt
        return [Example(e.teacher_opening, [IGNORE] * len(e.teacher_opening)) for e in examples if e.teacher_opening]

    def start(self, model: Any, tokenizer: Any) -> None:
        super().start(model, tokenizer)
        self.model, self.tokenizer = model, tokenizer

    def warm(self, step_no: int, total: int) -> bool:
        return step_no < math.ceil(self.cfg.onpolicy_warmup * total)

    def select(self, step: list[RecordExamples], step_no: int) -> list[RecordExamples]:
        if self.warm(step_no, self.total_steps):
            return super().select(step, step_no)
        usable = [e for e in step if e.student_opening and e.teacher_opening]
        return self.sample(usable) if usable else []

    @torch.no_grad()
    def sample(self, records: list[RecordExamples]) -> list[RecordExamples]:
        """Each record's reply sampled by the adapter without the prompt, in both views."""
        model, tok = self.model, self.tokenizer
        was_training = model.training
        model.eval()
        width = max(len(e.student_opening) for e in records)
        pad = tok.pad_token_id
        ids = torch.tensor(
            [[pad] * (width - len(e.student_opening)) + e.student_opening for e in records], device=model.device
        )
        mask = torch.tensor(
            [[0] * (width - len(e.student_opening)) + [1] * len(e.student_opening) for e in records],
            device=model.device,
        )
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            top_k=None,
            top_p=1.0,
            temperature=self.cfg.onpolicy_temperature,
            max_new_tokens=self.cfg.onpolicy_max_tokens,
            pad_token_id=pad,
        )
        if was_training:
            model.train()
        sampled: list[RecordExamples] = []
        eos = tok.eos_token_id
        for e, row in zip(records, out[:, width:].tolist()):
            reply = row[: row.index(eos) + 1] if eos in row else row  # the end of turn is learned too
            if not reply or reply == [eos]:
                continue
            sampled.append(
                Sampled(
                    Example(e.student_opening + reply, [IGNORE] * len(e.student_opening) + reply),
                    None,
                    Example(e.teacher_opening + reply, [IGNORE] * len(e.teacher_opening) + reply),
                )
            )
        return sampled

    def micro_loss(
        self, model: Any, micro: list[RecordExamples], counts: dict[str, int], pad_id: int
    ) -> tuple[torch.Tensor, dict[str, float]] | None:
        if not any(isinstance(e, Sampled) for e in micro):
            return super().micro_loss(model, micro, counts, pad_id)
        device = next(model.parameters()).device
        student_logits, targets = label_logits(model, collate([e.sft for e in micro], pad_id, device))
        teacher_logits, _ = self.prefix.label_logits(model, [e.teacher for e in micro], pad_id)
        kl = topk_tail_kl(
            F.log_softmax(student_logits.float(), -1), F.log_softmax(teacher_logits.float(), -1), self.cfg.kl_top_k
        ).sum()
        n = counts["sft"]
        return kl / n, {"reverse_kl": kl.item() / n, "sample_tokens": float(targets.numel())}

    def token_counts(self, step: list[RecordExamples]) -> dict[str, int]:
        return {"sft": label_tokens([e.sft for e in step if e.sft is not None]), "pg": 0}
