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
    flags = ["serve", "--check", "--store.url", str(tmp_path / "store"), "--models.target.name", TINY,
             "--models.target.dtype", "bfloat16"]  # probes were float32: the check uses a float32 twin
    assert main(flags) == 0
    out = capsys.readouterr().out
    assert "shell-agent@good: passed" in out and "shell-agent@unprobed: unchecked (no probes recorded)" in out
    publish(store, spec, "tampered", random_adapter(tmp_path / "tampered", seed=3), probes_from=tmp_path / "good")
    assert main(flags) == 1
    assert "shell-agent@tampered: FAILED: parity check failed: probe 0" in capsys.readouterr().out
