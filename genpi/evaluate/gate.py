"""The fidelity gate: which adapters may be published.

An adapter passes only when, on the test inputs, its first-turn action-format validity keeps at
least ``eval.min_retention`` of the teacher's and it closes at least ``eval.min_gap_closed`` of
the teacher-forced NLL gap between base and teacher. Publishing is :mod:`genpi.registry`'s.
"""

from __future__ import annotations

from typing import Any

from genpi.config import EvalConfig


def gate_decision(report: dict[str, Any], cfg: EvalConfig, set_name: str = "test") -> dict[str, Any]:
    """Which checks ran on ``set_name``, their values and thresholds, and whether all passed."""
    comparison = report["sets"].get(set_name, {}).get("comparison", {})
    wanted = [("format_valid", "retention", cfg.min_retention), ("nll", "gap_closed", cfg.min_gap_closed)]
    checks = []
    for metric, kind, threshold in wanted:
        if metric not in comparison:
            continue  # e.g. a prompt without action regexes has no format metric
        value = comparison[metric][kind]
        passed = value is not None and value >= threshold
        checks.append(
            {
                "metric": metric,
                "kind": kind,
                "value": value,
                "threshold": threshold,
                "passed": passed,
                "interval": comparison[metric].get(f"{kind}_interval"),
                "short_by": None if passed or value is None else round(threshold - value, 4),
            }
        )
    if not checks:
        return {"passed": False, "set": set_name, "checks": [], "summary": f"no {set_name} inputs were evaluated"}
    failed = [c for c in checks if not c["passed"]]
    summary = "; ".join(
        f"{c['metric']} {c['kind']} {'n/a' if c['value'] is None else format(c['value'], '.0%')} "
        + (f"[95% {c['interval'][0]:.0%}, {c['interval'][1]:.0%}] " if c["interval"] and c["value"] is not None else "")
        + f"{'>=' if c['passed'] else '<'} {c['threshold']:.0%}"
        + (f" (short by {c['short_by']:.0%})" if c["short_by"] else "")
        for c in checks
    )
    return {"passed": not failed, "set": set_name, "checks": checks, "summary": summary}
