"""What every objective provides to the shared training loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

from genpi.config import TrainConfig
from genpi.train.examples import Example, RecordExamples
from genpi.train.teacher_prefix import TeacherPrefix

ObjectiveClass = TypeVar("ObjectiveClass", bound="type[Objective]")
OBJECTIVES: dict[str, type[Objective]] = {}  # train.method -> objective class, filled by register_objective


def register_objective(method: str) -> Callable[[ObjectiveClass], ObjectiveClass]:
    """Class decorator: the objective that ``train.method: <method>`` trains with."""

    def register(cls: ObjectiveClass) -> ObjectiveClass:
        cls.name = method
        OBJECTIVES[method] = cls
        return cls

    return register


class Objective:
    """Turns one optimizer step's examples into a loss, micro-batch by micro-batch.

    Lifecycle: :meth:`prepare` once per run (which view of each record is trained), :meth:`start`
    once the model is loaded (``total_steps`` is set by then), then per
    step :meth:`select` (which examples this step uses), :meth:`token_counts` (the step's
    normalizers) and :meth:`micro_loss` for each micro-batch.
    """

    name = ""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.total_steps = 0

    def start(self, model: Any, tokenizer: Any) -> None:
        """Called once the model is loaded, before the first step (objectives that generate keep it)."""

    def prepare(self, examples: list[RecordExamples]) -> list[RecordExamples]:
        """The examples the run trains on, derived once from every record's examples."""
        return examples

    def select(self, step: list[RecordExamples], step_no: int) -> list[RecordExamples]:
        """The examples step ``step_no`` uses."""
        return step

    def token_counts(self, step: list[RecordExamples]) -> dict[str, int]:
        """Label-token counts of the whole step, one per loss term."""
        raise NotImplementedError

    def micro_loss(
        self, model: Any, micro: list[RecordExamples], counts: dict[str, int], pad_id: int
    ) -> tuple[torch.Tensor, dict[str, float]] | None:
        """The micro-batch's share of the step loss and of each named term; None when it has no example."""
        raise NotImplementedError


class FromTeacherViews(Objective):
    """An objective whose teacher reads the records' teacher views: :meth:`prepare` collects them
    (train and validation), :meth:`start` caches the prompt they open with (``self.prefix``)."""

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.teacher_views: list[Example] = []

    def views(self, examples: list[RecordExamples]) -> list[Example]:
        """The teacher views the objective's teacher will read (whole teacher examples by default)."""
        return [e.teacher for e in examples if e.teacher is not None]

    def prepare(self, examples: list[RecordExamples]) -> list[RecordExamples]:
        self.teacher_views += self.views(examples)
        return super().prepare(examples)

    def start(self, model: Any, tokenizer: Any) -> None:
        super().start(model, tokenizer)
        self.prefix = TeacherPrefix(model, self.teacher_views)
