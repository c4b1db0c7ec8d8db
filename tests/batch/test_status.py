"""A batch's manifest while it runs and after, and ``genpi status`` reading it."""

from __future__ import annotations

from pathlib import Path

import pytest

from genpi import artifacts
from genpi.batch.manifest import Progress, PromptResult, write_batch
from genpi.cli import main
from genpi.config import load_config
from genpi.store import open_store
from tests.fakes import mini_spec


def test_status_follows_a_batch_while_it_runs_and_after(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    store = open_store(str(tmp_path / "store"))
    cfg = load_config("local", overrides={"store.url": store.url})
    spec = mini_spec()
    results = {"a": PromptResult("a", "h1"), spec.name: PromptResult(spec.name, spec.prompt_hash)}
    prefix = artifacts.batch_prefix([spec], cfg, {})
    progress = Progress(store, prefix, cfg, results)
    argv = ["status", "--store.url", store.url]
    assert main(argv) == 2 and "does not exist" in capsys.readouterr().err  # a typo in the path, say
    store.root.mkdir()
    assert main(argv) == 2 and "has no batches yet" in capsys.readouterr().err

    progress.begin("a", "synthesis")
    progress.begin(spec.name, "synthesis")
    progress.finished("a", "synthesis", 12.3)
    progress.begin("a", "training")
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"batch {prefix.split('/')[1]}" in out and "running since" in out
    assert "a: training (1 of 4 stages done)  [synthesis 12s]" in out and f"{spec.name}: synthesis (0 of 4" in out

    results["a"].status, results["a"].stage, results["a"].error = "failed", "training", "no run finished"
    results[spec.name].status, results[spec.name].stage = "done", "evaluated"
    results[spec.name].passed, results[spec.name].published = True, "adapters/mini/v1"
    write_batch([spec], cfg, store, list(results.values()), [], {}, 61.0, progress.started_at)
    assert store.get_json(f"{prefix}/manifest.json")["state"] == "finished"
    assert main(["status", "--store.url", store.url]) == 0
    out = capsys.readouterr().out
    assert "\nfinished 20" in out and "after 1.0 min" in out and "finished: finished" not in out
    assert "a: FAILED in training: no run finished" in out and f"{spec.name}: published adapters/mini/v1" in out
    assert main(["status", "nope", "--store.url", store.url]) == 2 and "batches there" in capsys.readouterr().err
