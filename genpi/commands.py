"""``genpi report`` and ``genpi ls``: read what finished jobs left in the store."""

from __future__ import annotations

from genpi.errors import GenPIError
from genpi.evaluate.gate import published_adapters
from genpi.evaluate.report import batch_table
from genpi.store import ArtifactStore


def print_report(store: ArtifactStore, batch: str | None) -> int:
    """Print one batch's fidelity table (the newest batch when ``batch`` is None)."""
    reports = {k.split("/")[1]: k for k in store.list_keys("batches") if k.endswith("/report.json")}
    if not reports:
        raise GenPIError(f"store {store.url} has no batch reports yet; run the job first "
                         f"(make run, or genpi --store.url {store.url})")
    if batch is None:
        batch = max(reports, key=lambda b: store.get_json(reports[b])["finished_at"])
    elif batch not in reports:
        raise GenPIError(f"store {store.url} has no batch {batch!r}; batches there: {', '.join(sorted(reports))}")
    data = store.get_json(reports[batch])
    print(f"batch {batch}, finished {data['finished_at']} ({store.location(reports[batch])})\n")
    print(batch_table(data["prompts"]))
    return 0


def list_published(store: ArtifactStore) -> int:
    """Print every published adapter: name, base model, gate figures and location."""
    adapters = published_adapters(store)
    if not adapters:
        print(f"no published adapters in {store.url}")
        return 0
    for a in adapters:
        fmt, nll = a["retention"].get("format_valid"), a["gap_closed"].get("nll")
        figures = ", ".join(part for part in (
            f"format retention {fmt:.0%}" if fmt is not None else "",
            f"NLL gap closed {nll:.0%}" if nll is not None else "") if part)
        print(f"{a['name']}  base {a['base_model']}  published {a['published_at']}  {figures}\n    {a['location']}")
    return 0
