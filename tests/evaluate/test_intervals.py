"""Intervals with known answers: Wilson on rates, the percentile bootstrap, and the report's intervals."""

from __future__ import annotations

import math

import pytest

from genpi.evaluate.metrics import bootstrap_interval, mean_figure, wilson_interval
from genpi.evaluate.report import batch_rows, batch_table, summarize_set
from genpi.prompt.spec import ActionFormat, PromptSpec, Turn


def test_wilson_interval_known_answers() -> None:
    low, high = wilson_interval(6, 8)
    assert math.isclose(low, 0.40927, abs_tol=1e-4) and math.isclose(high, 0.92852, abs_tol=1e-4)
    z2 = 1.959963984540054**2
    assert wilson_interval(0, 8) == (0.0, pytest.approx(z2 / (8 + z2)))  # upper end at 0 successes
    assert wilson_interval(8, 8) == (pytest.approx(8 / (8 + z2)), 1.0)
    assert wilson_interval(50, 100) == (pytest.approx(0.40383, abs=1e-4), pytest.approx(0.59617, abs=1e-4))
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


def test_mean_figure_gives_rates_an_interval_and_means_none() -> None:
    assert mean_figure([True, False, True, True])["interval"] == wilson_interval(3, 4)
    assert "interval" not in mean_figure([0.5, 1.0]) and "interval" not in mean_figure([])


def test_bootstrap_interval_on_a_fixed_sample() -> None:
    # The mean of two resampled values of {0, 1} is 0, 0.5 or 1 (1/4, 1/2, 1/4): the 95% interval is [0, 1].
    assert bootstrap_interval([0.0, 1.0], lambda xs: sum(xs) / len(xs), resamples=4000) == (0.0, 1.0)
    assert bootstrap_interval([3.0] * 5, lambda xs: sum(xs) / len(xs)) == (3.0, 3.0)
    values = [float(v) for v in range(20)]
    first = bootstrap_interval(values, lambda xs: sum(xs) / len(xs), seed=7)
    assert first == bootstrap_interval(values, lambda xs: sum(xs) / len(xs), seed=7)  # a fixed seed repeats
    assert first[0] < 9.5 < first[1]
    # Undefined in most resamples (here: whenever the first draw is 0, 3 in 4): no interval.
    assert bootstrap_interval([0, 0, 0, 1], lambda xs: 1.0 if xs[0] else None) is None
    assert bootstrap_interval([], lambda xs: 0.0) is None


SPEC = PromptSpec(
    name="mini",
    source="mini.md",
    turns=(Turn("system", "Answer with Act: lines."),),
    action_format=ActionFormat(actions=(r"^Act: \S",)),
)


def episodes(replies: list[str]) -> list[dict]:
    return [{"input": f"task {i}", "turns": [{"agent": r, "observation": ""}]} for i, r in enumerate(replies)]


def test_summarize_set_reports_intervals_and_the_batch_table_shows_them() -> None:
    teacher = episodes(["Act: ls"] * 8)
    base = episodes(["no"] * 8)
    adapter = episodes(["Act: ls"] * 6 + ["no"] * 2)
    scores = [
        {
            s: {"tokens": 10, "nll_sum": nll, "kl_sum": 0.0}
            for s, nll in (("teacher", 5.0), ("base", 15.0), ("adapter", 7.0 + i % 2))
        }
        for i in range(8)
    ]
    summary = summarize_set(SPEC, {"teacher": teacher, "base": base, "adapter": adapter}, scores)
    fv = summary["comparison"]["format_valid"]
    assert fv["adapter"] == 0.75 and fv["adapter_interval"] == [round(x, 4) for x in wilson_interval(6, 8)]
    assert fv["retention"] == 0.75 and fv["retention_interval"][0] <= 0.75 <= fv["retention_interval"][1]
    assert fv["gap_closed_interval"] == fv["retention_interval"]  # base 0, teacher 1: the two coincide
    nll = summary["comparison"]["nll"]
    assert nll["gap_closed"] == pytest.approx(0.75)  # (7.5 - 15) / (5 - 15)
    low, high = nll["gap_closed_interval"]
    assert 0.7 <= low <= 0.75 <= high <= 0.8
    report = {"prompt": "mini", "sets": {"test": summary}, "gate": {"passed": True, "summary": "ok"}}
    table = batch_table(batch_rows([report]))
    lo, hi = fv["retention_interval"]
    assert f"| 75% [{lo:.0%}, {hi:.0%}] |" in table and f"| 75% [{low:.0%}, {high:.0%}] |" in table
    # every system's rate carries its Wilson interval over the 8 inputs: 8, 0 and 6 of 8
    assert "| mini | 8 | 100% [68%, 100%] | 0% [0%, 32%] | 75% [41%, 93%] |" in table


def test_per_turn_retention_and_the_drift_check_of_the_gate() -> None:
    from genpi.config import EvalConfig
    from genpi.evaluate.gate import gate_decision
    from genpi.evaluate.report import per_turn_retention

    def played(turns: list[list[str]]) -> list[dict]:
        return [
            {"input": f"t{i}", "turns": [{"agent": r, "observation": "ok"} for r in t]} for i, t in enumerate(turns)
        ]

    # 8 inputs, 3 turns: the teacher stays valid; the adapter drifts on turn 3 (4 of 8 valid); two
    # of the teacher's episodes end after turn 2, so turn 3 counts 6 teacher episodes.
    teacher = played([["Act: a"] * 3] * 6 + [["Act: a"] * 2] * 2)
    adapter = played([["Act: a", "Act: b", "Act: c"]] * 4 + [["Act: a", "Act: b", "drifted"]] * 4)
    rows = per_turn_retention(SPEC, {"teacher": teacher, "adapter": adapter}, 3, seed=0)
    assert [r["value"] for r in rows] == [1.0, 1.0, 0.5]
    assert [(r["teacher_n"], r["adapter_n"]) for r in rows] == [(8, 8), (8, 8), (6, 8)]
    assert rows[0]["interval"] == [1.0, 1.0] and rows[2]["interval"][0] < 0.5 < rows[2]["interval"][1]
    comparison = {"format_valid": {"retention": 1.0, "gap_closed": 1.0}, "nll": {"retention": 1.0, "gap_closed": 0.9}}
    report = {"sets": {"test": {"comparison": comparison, "per_turn_format_retention": rows}}}
    decision = gate_decision(report, EvalConfig(min_retention=0.8, min_gap_closed=0.5))
    assert not decision["passed"] and "format_valid turn 3 retention 50%" in decision["summary"]
    rows[2]["teacher_n"] = 3  # too few episodes reached turn 3: turn 2 is the worst one checked
    decision = gate_decision(report, EvalConfig(min_retention=0.8, min_gap_closed=0.5))
    assert decision["passed"] and "format_valid turn 2 retention 100%" in decision["summary"]
    report.update(prompt="mini", gate=decision)
    lo, hi = rows[2]["interval"]
    per_turn = f"| 100% [100%, 100%] / 100% [100%, 100%] / 50% [{lo:.0%}, {hi:.0%}] |"
    assert per_turn in batch_table(batch_rows([report]))  # the batch table's per-turn cells carry them too
