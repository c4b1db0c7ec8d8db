"""``genpi``: the paper's joint loss ``(1 - λ) · L_SFT + λ · L_PG``; ``sft`` is the same at λ = 0."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from genpi.train.batches import collate
from genpi.train.examples import RecordExamples
from genpi.train.loss import joint_loss, label_tokens, summed_token_loss
from genpi.train.objectives.base import Objective, register_objective


def pg_kept(fraction: float, step: int, batch_size: int) -> int:
    """How many PG examples step ``step`` keeps so that, over the run, ``fraction`` of all records'
    PG examples are used, spread evenly over the steps (0.1 at batch 4: one every 2-3 steps)."""
    return math.floor(fraction * (step + 1) * batch_size + 1e-9) - math.floor(fraction * step * batch_size + 1e-9)


def with_pg_fraction(step: list[RecordExamples], keep: int) -> list[RecordExamples]:
    """Keep the first ``keep`` PG examples of a (shuffled) step, drop the others'."""
    out = []
    for e in step:
        out.append(e if keep > 0 else dataclasses.replace(e, pg=None))
        keep -= e.pg is not None
    return out


@register_objective("genpi")
class GenPI(Objective):
    @property
    def pg_lambda(self) -> float:
        return self.cfg.pg_lambda

    def select(self, step: list[RecordExamples], step_no: int) -> list[RecordExamples]:
        keep = pg_kept(self.cfg.pg_fraction, step_no, self.cfg.batch_size) if self.pg_lambda else 0
        return with_pg_fraction(step, keep)

    def token_counts(self, step: list[RecordExamples]) -> dict[str, int]:
        return {
            "sft": label_tokens([e.sft for e in step if e.sft is not None]),
            "pg": label_tokens([e.pg for e in step if e.pg is not None]),
        }

    def sft_term(
        self, model: Any, records: list[RecordExamples], pad_id: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The summed SFT term over ``records`` (each has an SFT example), and its named parts."""
        total = summed_token_loss(model, collate([e.sft for e in records], pad_id, next(model.parameters()).device))
        return total, {"sft_loss": total}

    def micro_loss(
        self, model: Any, micro: list[RecordExamples], counts: dict[str, int], pad_id: int
    ) -> tuple[torch.Tensor, dict[str, float]] | None:
        with_sft = [e for e in micro if e.sft is not None]
        pg = [e.pg for e in micro if e.pg is not None]
        if not with_sft and not pg:
            return None
        device = next(model.parameters()).device
        zero = torch.zeros((), device=device)
        sft_sum, parts = self.sft_term(model, with_sft, pad_id) if with_sft else (zero, {"sft_loss": zero})
        pg_sum = summed_token_loss(model, collate(pg, pad_id, device)) if pg else zero
        loss = joint_loss(sft_sum, counts["sft"], pg_sum, counts["pg"], self.pg_lambda)
        terms = {name: value.item() / counts["sft"] if counts["sft"] else 0.0 for name, value in parts.items()}
        return loss, {**terms, "pg_loss": pg_sum.item() / counts["pg"] if counts["pg"] else 0.0}


@register_objective("sft")
class SFT(GenPI):
    """SFT on the role-played conversations only: no PG example is ever used."""

    @property
    def pg_lambda(self) -> float:
        return 0.0
