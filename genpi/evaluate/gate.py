"""The fidelity gate, and publishing the adapters that pass it.

An adapter is published only when, on the test inputs, its first-turn action-format validity
keeps at least ``eval.min_retention`` of the teacher's and it closes at least
``eval.min_gap_closed`` of the teacher-forced NLL gap between base and teacher. Published
adapters are copied, with a manifest, to an immutable name under ``adapters/<prompt name>/``.
"""

from __future__ import annotations

import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from genpi import layout
from genpi.config import EvalConfig, GenPIConfig
from genpi.prompts import PromptSpec
from genpi.store import ArtifactStore

MANIFEST = "manifest.json"


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
        checks.append({"metric": metric, "kind": kind, "value": value, "threshold": threshold, "passed": passed,
                       "short_by": None if passed or value is None else round(threshold - value, 4)})
    if not checks:
        return {"passed": False, "set": set_name, "checks": [],
                "summary": f"no {set_name} inputs were evaluated"}
    failed = [c for c in checks if not c["passed"]]
    summary = "; ".join(
        f"{c['metric']} {c['kind']} {'n/a' if c['value'] is None else format(c['value'], '.0%')} "
        f"{'>=' if c['passed'] else '<'} {c['threshold']:.0%}"
        + (f" (short by {c['short_by']:.0%})" if c["short_by"] else "") for c in checks)
    return {"passed": not failed, "set": set_name, "checks": checks, "summary": summary}


def publish(spec: PromptSpec, cfg: GenPIConfig, store: ArtifactStore, report: dict[str, Any]) -> str:
    """Copy the adapter and its manifest to its immutable published name; returns its location.

    A name that already exists is never overwritten: the same run published twice is one adapter.
    """
    target = layout.published_prefix(spec, cfg)
    if store.exists(f"{target}/{MANIFEST}"):
        return store.location(target)
    source = f"{layout.train_prefix(spec, cfg)}/adapter"
    with tempfile.TemporaryDirectory(prefix="genpi-publish-") as tmp:
        folder = store.download_dir(source, Path(tmp) / "adapter")
        store.upload_dir(folder, target)
    test = report["sets"].get("test", {}).get("comparison", {})
    store.put_json(f"{target}/{MANIFEST}", {
        "name": target.split("/", 1)[1], "prompt": spec.name, "prompt_hash": spec.prompt_hash,
        "run_hash": layout.run_hash(cfg), "base_model": cfg.models.target.name,
        "published_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": store.location(source), "gate": report["gate"],
        "retention": {m: row["retention"] for m, row in test.items()},
        "gap_closed": {m: row["gap_closed"] for m, row in test.items()},
        "report": report["location"]})
    return store.location(target)


def published_adapters(store: ArtifactStore) -> list[dict[str, Any]]:
    """Every published adapter's manifest, newest first."""
    keys = [k for k in store.list_keys("adapters") if k.endswith(f"/{MANIFEST}") and k.count("/") == 3]
    manifests = [{**store.get_json(k), "location": store.location(k.rsplit("/", 1)[0])} for k in keys]
    return sorted(manifests, key=lambda m: m["published_at"], reverse=True)
