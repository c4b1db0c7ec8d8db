"""Resumable chunked work: records are produced and stored part by part.

A part is written atomically once finished, so a failure mid-stage keeps every finished part
and a rerun starts where the last one stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

from genpi.store import ArtifactStore

T = TypeVar("T")
log = logging.getLogger(__name__)


def run_in_parts(
    store: ArtifactStore,
    prefix: str,
    items: Sequence[T],
    part_size: int,
    produce: Callable[[Sequence[T]], list[dict]],
    what: str,
) -> list[dict]:
    """Map ``produce`` over ``items`` in parts stored as ``{prefix}/part-NNNNN.jsonl``; reuse stored parts."""
    records: list[dict] = []
    parts = range(0, len(items), part_size)
    for number, start in enumerate(parts):
        key = f"{prefix}/part-{number:05d}.jsonl"
        if store.exists(key):
            records.extend(store.get_jsonl(key))
            continue
        produced = produce(items[start : start + part_size])
        store.put_jsonl(key, produced)
        records.extend(produced)
        log.info("%s: part %d/%d done", what, number + 1, len(parts))
    return records
