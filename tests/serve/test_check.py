"""``genpi serve --check`` (no server): every published version's digests and parity probes."""

from __future__ import annotations

from pathlib import Path

import pytest

from genpi.cli.main import main
from genpi.models import TINY
from genpi.store import open_store
from tests.serve.support import prompt_spec, publish, random_adapter

pytestmark = pytest.mark.timeout(120)


def test_check_passes_good_versions_and_fails_a_tampered_one(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    store = open_store(str(tmp_path / "store"))
    spec = prompt_spec("shell-agent")
    publish(store, spec, "good", random_adapter(tmp_path / "good", seed=1))
    publish(store, spec, "unprobed", random_adapter(tmp_path / "unprobed", seed=2), probes=False)
    flags = [
        "serve",
        "--check",
        "--store.url",
        str(tmp_path / "store"),
        "--models.target.name",
        TINY,
        "--models.target.dtype",
        "bfloat16",
    ]  # probes were float32: the check uses a float32 twin
    assert main(flags) == 0
    out = capsys.readouterr().out
    assert "shell-agent@good: passed" in out and "shell-agent@unprobed: unchecked (no probes recorded)" in out
    publish(store, spec, "tampered", random_adapter(tmp_path / "tampered", seed=3), probes_from=tmp_path / "good")
    assert main(flags) == 1
    assert "shell-agent@tampered: FAILED: parity check failed: probe 0" in capsys.readouterr().out


def test_the_evaluate_stage_records_probes_that_the_check_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from genpi import artifacts, registry
    from genpi.config import load_config
    from genpi.evaluate.stage import publish_run, record_probes

    url = str(tmp_path / "store")
    store, spec = open_store(url), prompt_spec("shell-agent")
    cfg = load_config("local", overrides={"store.url": url, "models.target.name": TINY})
    train = artifacts.train_prefix(spec, cfg)
    store.upload_dir(random_adapter(tmp_path / "adapter", seed=4), f"{train}/adapter")
    probes = record_probes(cfg, store, train, list(spec.example_inputs))
    report = {"location": "report.md", "gate": {"passed": True}, "sets": {}}
    publish_run(spec, cfg, store, report, probes)
    [entry] = registry.published(store)
    assert len(entry.probes) == 3 and entry.probes[0]["dtype"] == "float32" and entry.probes[0]["reply"]
    assert main(["serve", "--check", "--store.url", url, "--models.target.name", TINY]) == 0
    assert f"{entry.name}: passed" in capsys.readouterr().out
