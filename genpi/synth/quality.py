"""Data-quality statistics of a synthesized set (the paper's Table 4, and more)."""

from __future__ import annotations

from collections import Counter
from statistics import mean
from typing import Any

from genpi.prompt.episodes import END_TOKEN, MAX_TURNS
from genpi.prompt.spec import PromptSpec
from genpi.prompt.views import NO_REASON
from genpi.synth.inputs import InputStats


def _share(n: int, total: int) -> float:
    return round(n / total, 4) if total else 0.0


def quality_report(
    spec: PromptSpec, records: list[dict], conversations: list[dict], input_stats: InputStats, max_turns: int
) -> dict[str, Any]:
    """Counts and shares that tell whether the synthetic data looks like the prompt's examples.

    ``records`` are joined records (input, student, teacher, reason, filtered turns);
    ``conversations`` the role play as generated (turns, end), in the same order. Role-play
    statistics describe the generated conversations; ``*_after_filter`` and the filter counts
    describe what the action-format filter kept (``off_format_turns_removed`` counts every turn
    it dropped: a conversation's first off-format turn and the turns after it).
    ``agent_turns_resampled_into_format`` counts greedy off-format turns that a sample in format
    replaced (they are included in ``agent_turns_in_action_format``). ``reasons`` counts the
    records given a reason (``synth.reason_fraction``); reason figures describe those.
    """
    n = len(records)
    fmt = spec.action_format
    ends = Counter(c["end"] for c in conversations)
    generated = [t for c in conversations for t in c["turns"]]
    kept = [t for r in records for t in r["turns"]]
    removed = [len(c["turns"]) - len(r["turns"]) for r, c in zip(records, conversations)]
    explained = [r for r in records if r["reason_finish"] != NO_REASON]
    report: dict[str, Any] = {
        "records": n,
        "reasons": len(explained),
        "inputs": vars(input_stats),
        "gold_turns_in_prompt": spec.gold_turns(),
        "avg_turns": round(mean(len(c["turns"]) for c in conversations), 3) if conversations else 0.0,
        "max_turns": max_turns,
        "hit_max_turns": _share(ends[MAX_TURNS], n),
        "abnormal_termination": _share(n - ends[END_TOKEN] - ends[MAX_TURNS], n),
        "end_reasons": dict(ends),
        "truncated_outputs": {
            "student": _share(sum(r["student_finish"] == "length" for r in records), n),
            "teacher": _share(sum(r["teacher_finish"] == "length" for r in records), n),
            "reason": _share(sum(r["reason_finish"] == "length" for r in explained), len(explained)),
            "agent_turns": _share(sum(t["agent_finish"] == "length" for t in generated), len(generated)),
        },
        "avg_chars": {
            "input": round(mean(len(r["input"]) for r in records), 1) if n else 0.0,
            "reason": round(mean(len(r["reason"]) for r in explained), 1) if explained else 0.0,
        },
        "off_format_turns_removed": sum(removed),
        "records_cut_by_format_filter": sum(k > 0 for k in removed),
        "records_without_valid_turns": sum(not r["turns"] for r in records),
        "avg_turns_after_filter": round(mean(len(r["turns"]) for r in records), 3) if n else 0.0,
    }
    if fmt.has_actions:
        report["teacher_action_format"] = _share(sum(fmt.is_action(r["teacher"]) for r in records), n)
        report["student_action_format"] = _share(sum(fmt.is_action(r["student"]) for r in records), n)
        report["agent_turns_in_action_format"] = _share(
            sum(fmt.is_action(t["agent"]) for t in generated), len(generated)
        )
        report["agent_turns_resampled_into_format"] = sum(bool(t.get("resampled")) for t in generated)
        report["agent_turns_in_action_format_after_filter"] = _share(
            sum(fmt.is_action(t["agent"]) for t in kept), len(kept)
        )
    if fmt.has_final:
        report["missing_final_action"] = _share(
            sum(not (c["turns"] and fmt.is_final(c["turns"][-1]["agent"])) for c in conversations), n
        )
    return report
