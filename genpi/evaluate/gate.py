"""The fidelity gate: which adapters may be published.

An adapter passes only when, on the test inputs, its first-turn action-format validity keeps at
least ``eval.min_retention`` of the teacher's, so does its validity at every later turn of the
episodes (format drift; turns that at least ``MIN_TURN_EPISODES`` episodes of both reached), and it
closes at least ``eval.min_gap_closed`` of the teacher-forced NLL gap between base and teacher.
Publishing is :mod:`genpi.registry`'s.
"""

from __future__ import annotations

from typing import Any

from genpi.config import EvalConfig

MIN_TURN_EPISODES = 4  # a later turn counts for the gate when this many episodes of teacher and adapter reached it


def gate_decision(report: dict[str, Any], cfg: EvalConfig, set_name: str = "test") -> dict[str, Any]:
    """Which checks ran on ``set_name``, their values and thresholds, and whether all passed."""
    comparison = report["sets"].get(set_name, {}).get("comparison", {})
    wanted = [("format_valid", "retention", cfg.min_retention), ("nll", "gap_closed", cfg.min_gap_closed)]
    checks = []
    for metric, kind, threshold in wanted:
        if metric not in comparison:
            continue  # e.g. a prompt without action regexes has no format metric
        checks.append(
            _check(metric, kind, comparison[metric][kind], threshold, comparison[metric].get(f"{kind}_interval"))
        )
    checks += _drift_checks(report["sets"].get(set_name, {}).get("per_turn_format_retention") or [], cfg)
    if not checks:
        return {"passed": False, "set": set_name, "checks": [], "summary": f"no {set_name} inputs were evaluated"}
    failed = [c for c in checks if not c["passed"]]
    summary = "; ".join(
        f"{_label(c)} {c['kind']} {'n/a' if c['value'] is None else format(c['value'], _precision(c))} "
        + (f"[95% {c['interval'][0]:.0%}, {c['interval'][1]:.0%}] " if c["interval"] and c["value"] is not None else "")
        + f"{'>=' if c['passed'] else '<'} {c['threshold']:.0%}"
        + (f" (short by {c['short_by']:{_precision(c)}})" if c["short_by"] else "")
        for c in checks
    )
    return {"passed": not failed, "set": set_name, "checks": checks, "summary": summary}


def _precision(check: dict[str, Any]) -> str:
    """Whole percents, or two decimals for a miss that whole percents would show as "50% < 50%"."""
    return ".2%" if check["short_by"] and check["short_by"] < 0.005 else ".0%"


def _drift_checks(per_turn: list[dict[str, Any]], cfg: EvalConfig) -> list[dict[str, Any]]:
    """The worst later turn's format retention as one check (none when episodes have one turn)."""
    later = [
        r for r in per_turn[1:] if r["value"] is not None and min(r["teacher_n"], r["adapter_n"]) >= MIN_TURN_EPISODES
    ]
    if not later:
        return []
    worst = min(later, key=lambda r: r["value"])
    check = _check("format_valid_later_turns", "retention", worst["value"], cfg.min_retention, worst["interval"])
    return [{**check, "turn": worst["turn"]}]


def _check(metric: str, kind: str, value: float | None, threshold: float, interval: list[float] | None) -> dict:
    """One gate check: an undefined value never passes."""
    passed = value is not None and value >= threshold
    return {
        "metric": metric,
        "kind": kind,
        "value": value,
        "threshold": threshold,
        "passed": passed,
        "interval": interval,
        "short_by": None if passed or value is None else round(threshold - value, 4),
    }


def _label(check: dict[str, Any]) -> str:
    return f"format_valid turn {check['turn']}" if "turn" in check else check["metric"]
