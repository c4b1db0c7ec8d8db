"""A batch's manifest and report in the store: every prompt's status, figures and gate decision.

``batches/<id>/manifest.json`` is the newest run's; ``batches/<id>/history/`` keeps one manifest per run.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime

from genpi import artifacts
from genpi.config import GenPIConfig
from genpi.errors import GenPIError
from genpi.prompt.spec import PromptSpec
from genpi.store import ArtifactStore

log = logging.getLogger(__name__)


def write_batch(specs: list[PromptSpec], cfg: GenPIConfig, store: ArtifactStore, results: list,
                reports: list[dict], real_inputs: dict[str, list[str]], seconds: float) -> str:
    """The batch manifest and report (JSON and Markdown); returns the batch's store prefix."""
    from genpi.evaluate.plots import retention_plot
    from genpi.evaluate.report import batch_rows, batch_table, selection_table

    prefix = artifacts.batch_prefix(specs, cfg, real_inputs)
    rows = batch_rows(reports)
    if rows:
        store.put_bytes(f"{prefix}/retention.png", retention_plot(
            "batch: first-turn action-format retention per prompt",
            [{"metric": r["prompt"], "retention": r["format_retention"], "n": r["n"]} for r in rows],
            cfg.eval.min_retention))
    finished = datetime.now(UTC).isoformat(timespec="seconds")
    selections = [r["selection"] for r in reports if r.get("selection")]
    store.put_json(f"{prefix}/report.json", {"finished_at": finished, "prompts": rows, "selections": selections})
    methods = "".join(f"\n{selection_table(s)}\n" for s in selections)
    store.put_text(f"{prefix}/report.md", f"# genpi batch {prefix.rsplit('/', 1)[-1]}\n\nFinished {finished} "
                   f"in {seconds / 60:.1f} min.\n\n{batch_table(rows)}\n{methods}")
    record = {"finished_at": finished, "seconds": round(seconds, 1), "config": cfg.to_dict(),
              "prompts": [vars(r) for r in results]}
    # manifest.json is the newest run of the batch; history/ keeps every run's, never overwritten
    store.create_json(f"{prefix}/history/{finished.replace(':', '')}-{uuid.uuid4().hex[:8]}.json", record)
    store.put_json(f"{prefix}/manifest.json", record)
    log.info("batch report: %s", store.location(f"{prefix}/report.md"))
    return prefix


def stored_batches(store: ArtifactStore, name: str = "manifest.json") -> dict[str, str]:
    """``{batch id: key}`` of every batch in ``store`` that has the file ``name``."""
    return {k.split("/")[1]: k for k in store.list_keys("batches") if k.count("/") == 2 and k.endswith(f"/{name}")}


def batch_file(store: ArtifactStore, batch: str, name: str = "manifest.json") -> str:
    """The key of ``batches/<batch>/<name>``, or a GenPIError that lists the batches there."""
    batches = stored_batches(store, name)
    if batch not in batches:
        raise GenPIError(f"store {store.url} has no batch {batch!r}; batches there: {', '.join(sorted(batches)) or 'none'}")
    return batches[batch]
