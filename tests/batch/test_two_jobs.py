"""Trust end to end: two jobs on one store, a job's temp folders, --force and the batch's history."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.repo import ROOT

TINY = [
    "--profile", "local", "--ray.dashboard", "false", "--ray.num-cpus", "2", "--only", "shell-agent",
    "--models.generator.name", "tiny-random-llama", "--models.target.name", "tiny-random-llama",
    "--models.generator.backend", "hf", "--models.target.backend", "hf",
    "--synth.num-inputs", "4", "--synth.min-inputs", "2", "--synth.part-size", "4", "--synth.max-turns", "1",
    "--synth.input-max-tokens", "32", "--synth.output-max-tokens", "8", "--synth.reason-max-tokens", "8",
    "--synth.agent-max-tokens", "8", "--synth.env-max-tokens", "8", "--synth.filter-off-format", "false",
    "--split.test-fraction", "0.25", "--train.epochs", "1", "--train.min-steps", "0", "--train.batch-size", "2",
    "--train.micro-batch-size", "1", "--eval.max-turns", "1", "--eval.max-tokens", "8", "--eval.env-max-tokens", "8",
    "--eval.latency-turns", "1", "--eval.latency-tokens", "2",
]  # fmt: skip


def _job(store: Path, tmp: Path, *flags: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(TMPDIR=str(tmp), PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "genpi.cli",
            "--prompts",
            str(ROOT / "prompts"),
            "--store.url",
            str(store),
            *TINY,
            *flags,
        ],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


@pytest.mark.slow  # ~2 min on 2 cores: make test-cluster
@pytest.mark.timeout(900)
def test_two_jobs_on_one_store_end_consistent(tmp_path: Path) -> None:
    from genpi.cli.main import main
    from genpi.store import open_store

    store_dir = tmp_path / "store"
    # a short private temp root: Ray's socket paths below it must stay under 108 characters
    tmp = Path(tempfile.mkdtemp(prefix="gt-", dir="/tmp"))
    try:
        jobs = [_job(store_dir, tmp), _job(store_dir, tmp)]
        outs = [job.communicate(timeout=800)[0] for job in jobs]
        codes = [job.returncode for job in jobs]
        assert 0 in codes and set(codes) <= {0, 1}, "\n\n".join(o[-3000:] for o in outs)
        for code, out in zip(codes, outs):
            if code:  # the second job met a stage the first was running: one line naming the holder
                assert "is in progress in another job" in out and "Traceback" not in out, out[-3000:]
        # each job removed its cluster's temp folder, with its workers' scratch folders in it
        assert not [p.name for p in tmp.iterdir() if p.name.startswith("genpi-")]

        store = open_store(str(store_dir))
        assert main(["verify", "--store.url", str(store_dir)]) == 0
        assert not [k for k in store.list_keys() if k.endswith(".lease") or "/ray/" in k or "/checkpoints/" in k]
        (batch,) = {k.split("/")[1] for k in store.list_keys("batches")}
        assert len(store.list_keys(f"batches/{batch}/history")) == 2  # both runs' manifests are kept

        # a rerun reuses everything; --force eval redoes the evaluation only
        again = _job(store_dir, tmp, "--force", "eval")
        out = again.communicate(timeout=600)[0]
        assert again.returncode == 0, out[-3000:]
        assert "synthesis found at" in out and "adapter found at" in out and "evaluation found at" not in out
        assert main(["verify", "--store.url", str(store_dir)]) == 0
        assert len(store.list_keys(f"batches/{batch}/history")) == 3
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
