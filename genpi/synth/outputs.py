"""Single-turn outputs of the target: without the prompt (student) and with it (teacher), greedy."""

from __future__ import annotations

from collections.abc import Sequence

from genpi.config import SynthConfig
from genpi.engines.base import SamplingParams
from genpi.prompt.spec import PromptSpec
from genpi.prompt.views import student_messages, teacher_messages


def single_turn_outputs(spec: PromptSpec, cfg: SynthConfig, target, inputs: Sequence[dict]) -> list[dict]:
    """For each ``{"id", "input"}``: the student's and the teacher's reply, in one batched call."""
    params = SamplingParams(max_new_tokens=cfg.output_max_tokens, temperature=0.0, seed=cfg.seed)
    student = [student_messages(r["input"]) for r in inputs]
    teacher = [teacher_messages(spec, r["input"]) for r in inputs]
    gens = target.generate(student + teacher, params)
    n = len(inputs)
    return [
        {
            "id": r["id"],
            "student": s.text,
            "teacher": t.text,
            "student_finish": s.finish_reason,
            "teacher_finish": t.finish_reason,
            "teacher_prompt_tokens": t.prompt_tokens,
            "student_prompt_tokens": s.prompt_tokens,
        }
        for r, s, t in zip(inputs, gens[:n], gens[n:])
    ]
