"""Parts: a step's finished parts survive a crash."""

from __future__ import annotations

from pathlib import Path

import pytest

from genpi.store import LocalStore
from genpi.synth.parts import run_in_parts
from tests.fakes import ScriptedFailure

# ------------------------------------------------------------------ parts


def test_run_in_parts_resumes_after_a_crash(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    items = list(range(7))
    seen: list[list[int]] = []
    crash_on = [2]  # the call number that fails; cleared for the rerun

    def produce(part):
        seen.append(list(part))
        if len(seen) in crash_on:
            raise ScriptedFailure("crash in part 2")
        return [{"x": i, "sq": i * i} for i in part]

    with pytest.raises(ScriptedFailure):
        run_in_parts(store, "s/parts", items, 3, produce, "test")
    assert store.list_keys("s/parts") == ["s/parts/part-00000.jsonl"]
    assert store.get_jsonl("s/parts/part-00000.jsonl") == [{"x": i, "sq": i * i} for i in range(3)]

    assert seen == [[0, 1, 2], [3, 4, 5]]
    seen.clear()
    crash_on.clear()
    records = run_in_parts(store, "s/parts", items, 3, produce, "test")
    assert seen == [[3, 4, 5], [6]]  # only the missing parts are produced
    assert records == [{"x": i, "sq": i * i} for i in items]
    assert store.list_keys("s/parts") == [f"s/parts/part-{k:05d}.jsonl" for k in range(3)]

    again = run_in_parts(store, "s/parts", items, 3, lambda part: pytest.fail("all parts are stored"), "test")
    assert again == records
