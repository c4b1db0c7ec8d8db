"""The job on the real embedded model (SmolLM2-135M-Instruct): minutes, so `make test-slow`."""

from __future__ import annotations

from pathlib import Path

import pytest

from genpi.store import open_store
from tests.batch.command import run_job
from tests.repo import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def test_embedded_adapter_internalizes_the_prompt(tmp_path: Path) -> None:
    """The first test that shows internalization: without the prompt, the adapter answers in the
    prompt's action format far more often than the base model, on held-out inputs. (Web shop: its
    teacher keeps the format on ~90% of synthesized turns, so its synthesis needs the fewest
    resampled turns and is the quickest of the three.)"""
    store_dir = tmp_path / "artifacts"
    result = run_job(
        "--prompts",
        str(ROOT / "prompts"),
        "--only",
        "web-shop-agent",
        "--profile",
        "local",
        "--eval-inputs",
        str(ROOT / "inputs"),
        "--ray.dashboard",
        "false",
        "--store.url",
        str(store_dir),
        timeout=1700,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    store = open_store(str(store_dir))
    [quality_key] = [k for k in store.list_keys("prompts") if k.endswith("quality.json")]
    quality = store.get_json(quality_key)
    # With the prompt the model answers in the prompt's action format far more often than without it.
    assert quality["teacher_action_format"] - quality["student_action_format"] >= 0.2, quality
    [report_key] = [k for k in store.list_keys("prompts") if "/eval/" in k and k.endswith("report.json")]
    report = store.get_json(report_key)
    for set_name in ("test", "user"):
        fmt = report["sets"][set_name]["comparison"]["format_valid"]
        assert fmt["base"] <= 0.1 and fmt["adapter"] - fmt["base"] >= 0.5, (set_name, fmt)
    nll = report["sets"]["test"]["comparison"]["nll"]
    assert nll["adapter"] < nll["base"], nll
