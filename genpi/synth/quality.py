"""Data-quality statistics of a synthesized set (the paper's Table 4, and more)."""

from __future__ import annotations

from collections import Counter
from statistics import mean
from typing import Any

from genpi.prompts import PromptSpec
from genpi.synth.inputs import InputStats
from genpi.synth.roleplay import END_TOKEN, MAX_TURNS


def _share(n: int, total: int) -> float:
    return round(n / total, 4) if total else 0.0


def quality_report(spec: PromptSpec, records: list[dict], input_stats: InputStats, max_turns: int) -> dict[str, Any]:
    """Counts and shares that tell whether the synthetic data looks like the prompt's examples.

    ``records`` are joined records: input, student, teacher, reason, turns, end.
    """
    n = len(records)
    fmt = spec.action_format
    ends = Counter(r["end"] for r in records)
    agent_turns = [t["agent"] for r in records for t in r["turns"]]
    report: dict[str, Any] = {
        "records": n,
        "inputs": vars(input_stats),
        "gold_turns_in_prompt": spec.gold_turns(),
        "avg_turns": round(mean(len(r["turns"]) for r in records), 3) if n else 0.0,
        "max_turns": max_turns,
        "hit_max_turns": _share(ends[MAX_TURNS], n),
        "abnormal_termination": _share(n - ends[END_TOKEN] - ends[MAX_TURNS], n),
        "end_reasons": dict(ends),
        "truncated_outputs": {
            "student": _share(sum(r["student_finish"] == "length" for r in records), n),
            "teacher": _share(sum(r["teacher_finish"] == "length" for r in records), n),
            "reason": _share(sum(r["reason_finish"] == "length" for r in records), n),
            "agent_turns": _share(sum(t["agent_finish"] == "length" for r in records for t in r["turns"]),
                                  len(agent_turns)),
        },
        "avg_chars": {
            "input": round(mean(len(r["input"]) for r in records), 1) if n else 0.0,
            "reason": round(mean(len(r["reason"]) for r in records), 1) if n else 0.0,
        },
    }
    if fmt.actions:
        report["teacher_action_format"] = _share(sum(fmt.is_action(r["teacher"]) for r in records), n)
        report["student_action_format"] = _share(sum(fmt.is_action(r["student"]) for r in records), n)
        report["agent_turns_in_action_format"] = _share(sum(fmt.is_action(t) for t in agent_turns), len(agent_turns))
    if fmt.final:
        report["missing_final_action"] = _share(
            sum(not (r["turns"] and fmt.is_final(r["turns"][-1]["agent"])) for r in records), n)
    return report
