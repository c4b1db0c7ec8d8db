"""Choosing a sweep's run on validation fidelity, and the side-by-side table."""

from __future__ import annotations

from genpi.evaluate.report import selection_table
from genpi.evaluate.selection import choose, run_figures, seed_groups
from tests.fakes import mini_spec


def row(method: str, lam: float, seed: int, fmt: float | None, gap: float | None) -> dict:
    return {"method": method, "pg_lambda": lam, "seed": seed, "format_retention": fmt, "nll_gap_closed": gap}


def test_choose_by_format_retention_then_gap_closed_first_wins_ties() -> None:
    rows = [row("genpi", 0.3, 0, 0.5, 0.9), row("genpi", 0.5, 0, 1.0, 0.2), row("sft", 0.3, 0, 1.0, 0.6)]
    assert choose(rows) == 2
    assert choose([row("a", 0, 0, None, 0.9), row("b", 0, 0, 0.1, None)]) == 1  # a missing figure ranks lowest
    assert choose([row("a", 0, 0, 1.0, 0.5), row("b", 0, 0, 1.0, 0.5)]) == 0


def test_seed_groups_mean_and_std() -> None:
    rows = [row("genpi", 0.3, 0, 0.5, 0.4), row("genpi", 0.3, 1, 1.0, 0.6), row("sft", 0.3, 0, 0.75, None)]
    groups = seed_groups(rows)
    assert groups[0] == {
        "method": "genpi",
        "pg_lambda": 0.3,
        "seeds": 2,
        "format_retention": 0.75,
        "format_retention_std": 0.3536,
        "nll_gap_closed": 0.5,
        "nll_gap_closed_std": 0.1414,
    }
    assert groups[1]["seeds"] == 1 and groups[1]["format_retention_std"] is None and groups[1]["nll_gap_closed"] is None
    table = selection_table({"prompt": "p", "chosen": 1, "runs": rows, "groups": groups})
    assert "| genpi | 0.30 | 2 | 75% ± 35 | 50% ± 14 | yes |" in table and "| sft | - | 1 | 75% | n/a |  |" in table


def test_run_figures_from_a_validation_summary() -> None:
    summary = {"n": 3, "comparison": {"format_valid": {"retention": 0.5, "adapter": 0.33}, "nll": {"gap_closed": 0.7}}}
    assert run_figures(mini_spec(), summary) == {
        "format_retention": 0.5,
        "adapter_format": 0.33,
        "nll_gap_closed": 0.7,
        "n": 3,
    }
    assert (
        run_figures(mini_spec(action_format=mini_spec().action_format.__class__()), summary)["format_retention"] is None
    )
