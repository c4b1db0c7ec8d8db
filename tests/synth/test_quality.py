"""The action-format filter, the quality report and the id-derived split."""

from __future__ import annotations

import dataclasses

from genpi.fingerprint import fingerprint
from genpi.prompt.episodes import EMPTY, END_TOKEN, MAX_TURNS
from genpi.prompt.splits import assign_splits
from genpi.synth.format_filter import cut_at_off_format, filter_record
from genpi.synth.inputs import InputStats
from genpi.synth.quality import quality_report
from tests.fakes import mini_spec

SPEC = mini_spec()


# ------------------------------------------------------------------ format filter, quality report, split


def record(
    turns: list[str],
    end: str,
    teacher: str = "Think: a\nAct: finish",
    student: str = "plain",
    finishes: tuple[str, str, str] = ("stop", "stop", "stop"),
    agent_finish: str = "stop",
) -> dict:
    return {
        "input": "x" * 10,
        "student": student,
        "teacher": teacher,
        "reason": "r" * 20,
        "student_finish": finishes[0],
        "teacher_finish": finishes[1],
        "reason_finish": finishes[2],
        "turns": [{"agent": a, "observation": "o", "agent_finish": agent_finish} for a in turns],
        "end": end,
    }


BASH = "Think: look\nAct: bash"


def test_format_filter_cuts_before_the_first_off_format_turn() -> None:
    turns = record([BASH, "I looked.", BASH, "Think: ok\nAct: finish"], MAX_TURNS)["turns"]
    assert cut_at_off_format(SPEC, turns) == turns[:1]
    assert cut_at_off_format(SPEC, turns[:1]) == turns[:1]
    assert cut_at_off_format(SPEC, [{"agent": "hello", "observation": "", "agent_finish": "stop"}]) == []
    no_regexes = mini_spec(action_format=dataclasses.replace(SPEC.action_format, actions=()))
    assert cut_at_off_format(no_regexes, turns) == turns
    r = record([BASH, "I looked.", BASH], MAX_TURNS)
    assert filter_record(SPEC, r, True) == {**r, "turns": r["turns"][:1], "turns_generated": 3}
    assert filter_record(SPEC, r, False) == {**r, "turns_generated": 3}
    assert len(r["turns"]) == 3  # the input record is not modified


def test_quality_report_numbers() -> None:
    raw = [
        record([BASH, "Think: ok\nAct: answer(3)"], END_TOKEN),
        record([BASH, BASH, BASH], MAX_TURNS, student="Think: s\nAct: finish", finishes=("length", "stop", "stop")),
        record([BASH, "Think: done\nAct: finish"], END_TOKEN, teacher="no format", agent_finish="length"),
        record(["chatty reply"], EMPTY),
        record([BASH, "I am done.", "Think: done\nAct: finish"], END_TOKEN),
    ]
    records = [filter_record(SPEC, r, True) for r in raw]
    stats = InputStats(requests=3, candidates=9, kept=5, rounds=1)
    q = quality_report(SPEC, records, raw, stats, 3)
    assert q["records"] == 5
    assert q["avg_turns"] == 2.2  # (2 + 3 + 2 + 1 + 3) / 5, as generated
    assert q["hit_max_turns"] == 0.2
    assert q["abnormal_termination"] == 0.2
    assert q["end_reasons"] == {END_TOKEN: 3, MAX_TURNS: 1, EMPTY: 1}
    assert q["missing_final_action"] == 0.4  # the max-turns and the chatty records
    assert q["teacher_action_format"] == 0.8
    assert q["student_action_format"] == 0.2
    assert q["agent_turns_in_action_format"] == round(9 / 11, 4)  # before the filter
    assert q["agent_turns_in_action_format_after_filter"] == 1.0  # 8 of 8 kept turns
    assert q["off_format_turns_removed"] == 3  # "chatty reply"; "I am done." and the finish after it
    assert q["records_cut_by_format_filter"] == 2 and q["records_without_valid_turns"] == 1
    assert q["avg_turns_after_filter"] == 1.6  # (2 + 3 + 2 + 0 + 1) / 5
    assert q["truncated_outputs"] == {"student": 0.2, "teacher": 0.0, "reason": 0.0, "agent_turns": round(2 / 11, 4)}
    assert q["gold_turns_in_prompt"] == 2 and q["max_turns"] == 3
    assert q["inputs"]["kept"] == 5
    assert q["avg_chars"] == {"input": 10.0, "reason": 20.0}


def test_quality_report_without_action_format_or_records() -> None:
    spec = mini_spec(action_format=dataclasses.replace(SPEC.action_format, actions=(), final=()))
    raw = [record(["a"], END_TOKEN)]
    q = quality_report(spec, [filter_record(spec, r, True) for r in raw], raw, InputStats(), 2)
    assert "missing_final_action" not in q and "teacher_action_format" not in q
    assert "agent_turns_in_action_format_after_filter" not in q and q["off_format_turns_removed"] == 0
    empty = quality_report(SPEC, [], [], InputStats(), 2)
    assert empty["records"] == 0 and empty["avg_turns"] == 0.0 and empty["hit_max_turns"] == 0.0


def test_assign_splits_deterministic_disjoint_complete() -> None:
    ids = list(range(40))
    a = assign_splits(ids, 0.25, 0.1, seed=1)
    assert a == assign_splits(list(reversed(ids)), 0.25, 0.1, seed=1)
    assert sorted(a) == ids and set(a.values()) == {"train", "val", "test"}  # every id in exactly one set
    sets = {name: {i for i, v in a.items() if v == name} for name in ("train", "val", "test")}
    assert [len(sets[n]) for n in ("train", "val", "test")] == [26, 10, 4]
    # the first ids by fingerprint([seed, id]) are test, the next val
    order = sorted(ids, key=lambda i: fingerprint([1, i]))
    assert sets["test"] == set(order[:4]) and sets["val"] == set(order[4:14])
    assert assign_splits(ids, 0.25, 0.1, seed=2) != a  # the seed matters
    assert set(assign_splits(ids, 0.0, 0.0, seed=1).values()) == {"train"}
    assert assign_splits([5], 0.5, 0.5, seed=0) == {5: "train"}  # at least one training record
    assert sorted(assign_splits([3, 4], 0.5, 0.5, seed=0).values()) == ["test", "train"]
    assert sorted(assign_splits([3, 4, 8, 9], 0.5, 0.5, seed=0).values()) == ["test", "test", "train", "val"]
    assert assign_splits([], 0.5, 0.5, seed=0) == {}
