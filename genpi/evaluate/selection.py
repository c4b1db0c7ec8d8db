"""Choosing one run of a sweep per prompt, on the validation split's fidelity.

Every run's adapter answers the validation inputs without the prompt; the run with the highest
first-turn action-format retention wins, ties broken by the teacher-forced NLL gap closed (the
first run listed wins a full tie). Runs that differ only in their seed form one (method, λ)
group, reported as mean ± std. Only the chosen run is then evaluated on the test split and gated.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
from pathlib import Path
from typing import Any

from genpi import artifacts
from genpi.config import GenPIConfig
from genpi.prompt.spec import PromptSpec
from genpi.store import ArtifactStore

log = logging.getLogger(__name__)


def run_figures(spec: PromptSpec, summary: dict[str, Any]) -> dict[str, float | None]:
    """What a run is chosen by: format-validity retention (agent prompts) and NLL gap closed."""
    comparison = summary.get("comparison", {})
    fmt = comparison.get("format_valid", {}) if spec.action_format.has_actions else {}
    return {
        "format_retention": fmt.get("retention"),
        "adapter_format": fmt.get("adapter"),
        "nll_gap_closed": comparison.get("nll", {}).get("gap_closed"),
        "n": summary.get("n", 0),
    }


def choose(rows: list[dict[str, Any]]) -> int:
    """Index of the best row by (format retention, NLL gap closed); a missing figure ranks lowest."""

    def key(k: int) -> tuple[float, float, int]:
        r = rows[k]
        low = float("-inf")
        fmt, gap = r["format_retention"], r["nll_gap_closed"]
        return (low if fmt is None else fmt, low if gap is None else gap, -k)

    return max(range(len(rows)), key=key)


def seed_groups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows grouped by (method, λ): mean and standard deviation of each figure over the seeds."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["pg_lambda"]), []).append(row)
    out = []
    for (method, pg_lambda), members in groups.items():
        entry: dict[str, Any] = {"method": method, "pg_lambda": pg_lambda, "seeds": len(members)}
        for figure in ("format_retention", "nll_gap_closed"):
            values = [m[figure] for m in members if m[figure] is not None]
            entry[figure] = round(statistics.fmean(values), 4) if values else None
            entry[f"{figure}_std"] = round(statistics.stdev(values), 4) if len(values) > 1 else None
        out.append(entry)
    return out


def select_run(spec: PromptSpec, runs: list[GenPIConfig], store: ArtifactStore) -> dict[str, Any]:
    """Score every trained run of ``spec`` on the validation split and choose one (stored)."""
    from genpi.evaluate.stage import evaluation_engine, validation_summary

    prefix = artifacts.selection_prefix(spec, runs)
    if store.is_done(prefix):
        return store.get_json(f"{prefix}/selection.json")
    engine = evaluation_engine(runs[0])
    rows = []
    with tempfile.TemporaryDirectory(prefix="genpi-select-") as tmp:
        for k, run in enumerate(runs):
            train = artifacts.train_prefix(spec, run)
            adapter = engine.add_adapter(store.download_dir(f"{train}/adapter", Path(tmp) / f"adapter-{k}"))
            summary = validation_summary(spec, run, store, engine, adapter)
            rows.append(
                {
                    "method": run.train.method,
                    "pg_lambda": run.train.pg_lambda,
                    "seed": run.train.seed,
                    "run_hash": artifacts.run_hash(run),
                    **run_figures(spec, summary),
                }
            )
    best = choose(rows)
    selection = {"prompt": spec.name, "split": "val", "chosen": best, "runs": rows, "groups": seed_groups(rows)}
    store.put_json(f"{prefix}/selection.json", selection)
    store.mark_done(prefix)
    log.info(
        "[%s] chose %s (lambda %.2f, seed %d) of %d runs on validation fidelity",
        spec.name,
        rows[best]["method"],
        rows[best]["pg_lambda"],
        rows[best]["seed"],
        len(rows),
    )
    return selection
