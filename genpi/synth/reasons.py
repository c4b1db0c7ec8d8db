"""Reasons: the generator explains why the prompt turns the student's answer into the teacher's."""

from __future__ import annotations

from collections.abc import Sequence

from genpi.config import SynthConfig
from genpi.engines.base import SamplingParams
from genpi.prompt.spec import PromptSpec
from genpi.synth import templates


def reasons(spec: PromptSpec, cfg: SynthConfig, generator, records: Sequence[dict]) -> list[dict]:
    """For each ``{"id", "input", "student", "teacher"}``: a reason of about ``reason_sentences`` sentences."""
    conversations = [
        templates.reason_request(spec, r["input"], r["student"], r["teacher"], cfg.reason_sentences) for r in records
    ]
    params = SamplingParams(
        max_new_tokens=cfg.reason_max_tokens,
        temperature=cfg.reason_temperature,
        top_p=cfg.reason_top_p,
        seed=cfg.seed + (records[0]["id"] if records else 0),
    )
    return [
        {"id": r["id"], "reason": g.text, "reason_finish": g.finish_reason}
        for r, g in zip(records, generator.generate(conversations, params))
    ]
