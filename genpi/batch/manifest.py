"""A batch's manifest and report in the store: every prompt's stage, status, figures and gate decision.

``batches/<id>/manifest.json`` is the newest run's, rewritten as each prompt's stages finish
(``state: running``, then ``finished``), so ``genpi status`` shows a running batch too;
``batches/<id>/history/`` keeps one finished manifest per run.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

from genpi import artifacts
from genpi.config import GenPIConfig
from genpi.errors import GenPIError
from genpi.prompt.spec import PromptSpec
from genpi.store import ArtifactStore

log = logging.getLogger(__name__)

STAGES = ("synthesis", "training", "selection", "evaluation")  # a prompt's stages, in order


@dataclass
class PromptResult:
    """Where one prompt got to: ``stage`` is the stage it is in (or failed in, or ``evaluated``)."""

    name: str
    prompt_hash: str
    status: str = "pending"  # pending | running | done | failed
    stage: str = ""
    error: str = ""
    artifacts: dict[str, str] = field(default_factory=dict)
    passed: bool | None = None  # the fidelity gate's decision, once evaluated
    gate: str = ""
    published: str | None = None
    run: str = ""  # the evaluated run: method, lambda, seed (and how it was chosen)
    seconds: dict[str, float] = field(default_factory=dict)  # each finished stage's wall time


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Progress:
    """The running batch's manifest, rewritten whenever a prompt finishes a stage (thread-safe)."""

    def __init__(self, store: ArtifactStore, prefix: str, cfg: GenPIConfig, results: dict[str, PromptResult]) -> None:
        self.store, self.prefix, self.cfg, self.results = store, prefix, cfg, results
        self.started_at = _now()
        self._lock = threading.Lock()

    def begin(self, prompt: str, stage: str) -> None:
        """``prompt`` entered ``stage``."""
        with self._lock:
            result = self.results[prompt]
            if result.status != "failed":
                result.status, result.stage = "running", stage
            self._write()

    def finished(self, prompt: str, stage: str, seconds: float) -> None:
        """``prompt`` finished ``stage``; it waits for the next one."""
        with self._lock:
            self.results[prompt].seconds[stage] = round(seconds, 1)
            self._write()

    def update(self) -> None:
        """Write the manifest as the results stand (after a failure or the gate)."""
        with self._lock:
            self._write()

    def _write(self) -> None:
        self.store.put_json(
            f"{self.prefix}/manifest.json",
            {
                "state": "running",
                "started_at": self.started_at,
                "updated_at": _now(),
                "config": self.cfg.to_dict(),
                "prompts": [vars(r) for r in self.results.values()],
            },
        )


def write_batch(
    specs: list[PromptSpec],
    cfg: GenPIConfig,
    store: ArtifactStore,
    results: list[PromptResult],
    reports: list[dict],
    real_inputs: dict[str, list[str]],
    seconds: float,
    started_at: str = "",
) -> str:
    """The batch manifest and report (JSON and Markdown); returns the batch's store prefix."""
    from genpi.evaluate.plots import retention_plot
    from genpi.evaluate.report import batch_rows, batch_table, selection_table

    prefix = artifacts.batch_prefix(specs, cfg, real_inputs)
    rows = batch_rows(reports)
    if rows:
        store.put_bytes(
            f"{prefix}/retention.png",
            retention_plot(
                "batch: first-turn action-format retention per prompt",
                [{"metric": r["prompt"], "retention": r["format_retention"], "n": r["n"]} for r in rows],
                cfg.eval.min_retention,
            ),
        )
    finished = _now()
    selections = [r["selection"] for r in reports if r.get("selection")]
    store.put_json(f"{prefix}/report.json", {"finished_at": finished, "prompts": rows, "selections": selections})
    methods = "".join(f"\n{selection_table(s)}\n" for s in selections)
    store.put_text(
        f"{prefix}/report.md",
        f"# genpi batch {prefix.rsplit('/', 1)[-1]}\n\nFinished {finished} "
        f"in {seconds / 60:.1f} min.\n\n{batch_table(rows)}\n{methods}",
    )
    record = {
        "state": "finished",
        "started_at": started_at,
        "finished_at": finished,
        "updated_at": finished,
        "seconds": round(seconds, 1),
        "config": cfg.to_dict(),
        "prompts": [vars(r) for r in results],
    }
    # manifest.json is the newest run of the batch; history/ keeps every run's, never overwritten
    store.create_json(f"{prefix}/history/{finished.replace(':', '')}-{uuid.uuid4().hex[:8]}.json", record)
    store.put_json(f"{prefix}/manifest.json", record)
    log.info("batch report: %s", store.location(f"{prefix}/report.md"))
    return prefix


REWRITE = "delete that batch's folder, or run the job again to write it"  # a batch file genpi cannot read


def stored_batches(store: ArtifactStore, name: str = "manifest.json") -> dict[str, str]:
    """``{batch id: key}`` of every batch in ``store`` that has the file ``name``."""
    return {k.split("/")[1]: k for k in store.list_keys("batches") if k.count("/") == 2 and k.endswith(f"/{name}")}


def batch_file(store: ArtifactStore, batch: str, name: str = "manifest.json") -> str:
    """The key of ``batches/<batch>/<name>``, or a GenPIError that lists the batches there."""
    batches = stored_batches(store, name)
    if batch not in batches:
        raise GenPIError(
            f"store {store.url} has no batch {batch!r}; batches there: {', '.join(sorted(batches)) or 'none'}"
        )
    return batches[batch]
