"""``prepend``: SFT where ``prepend_fraction`` of the records are trained with the prompt before
them (the teacher view), the rest without (the paper's 100% and 50% baselines)."""

from __future__ import annotations

import dataclasses
import math

from genpi.train.examples import RecordExamples
from genpi.train.objectives.base import register_objective
from genpi.train.objectives.genpi import SFT


def prepended(k: int, fraction: float) -> bool:
    """Whether record ``k`` gets the prompt: ``fraction`` of the records, spread evenly."""
    return math.floor(fraction * (k + 1) + 1e-9) > math.floor(fraction * k + 1e-9)


@register_objective("prepend")
class Prepend(SFT):
    def prepare(self, examples: list[RecordExamples]) -> list[RecordExamples]:
        # A record whose teacher view did not fit keeps its student view.
        return [
            dataclasses.replace(e, sft=e.teacher)
            if e.teacher is not None and e.sft is not None and prepended(k, self.cfg.prepend_fraction)
            else e
            for k, e in enumerate(examples)
        ]
