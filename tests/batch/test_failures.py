"""Failures mid-run: the driver killed (SIGKILL) mid-synthesis, mid-training and mid-evaluation, and a
training worker killed. Each rerun finishes the batch without redoing a finished stage, with the same
artifacts, byte for byte, as a run never stopped (those that record timings aside). Five runs of the
job: ``make test-slow``."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from tests.batch.command import TINY_RUN
from tests.repo import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

RUN = [
    *TINY_RUN,
    "--only",
    "shell-agent",
    "--synth.num-inputs",
    "4",
    "--synth.min-inputs",
    "2",
    "--synth.part-size",
    "2",  # two parts a step: a kill lands between them
    "--synth.max-turns",
    "1",
    "--split.test-fraction",
    "0.25",
    "--train.min-steps",
    "24",
    "--train.batch-size",
    "2",
    "--train.micro-batch-size",
    "1",
    "--train.checkpoint-steps",
    "2",
]
# Files that record how long something took or when: they differ between any two runs.
TIMED = {"_SUCCESS", "metrics.json", "summary.json", "efficiency.json", "report.json", "report.md", "efficiency.png"}


@pytest.fixture(scope="module")
def workspace() -> Iterator[Path]:
    """A short private temp root: Ray's socket paths below it must stay under 108 characters."""
    root = Path(tempfile.mkdtemp(prefix="gf-", dir="/tmp"))
    (root / "tmp").mkdir()
    yield root
    shutil.rmtree(root, ignore_errors=True)


def start(root: Path, store: Path, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(TMPDIR=str(root / "tmp"), PYTHONPATH=str(ROOT))
    with log.open("a") as out:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "jobs" / "internalize.py"), "--prompts", str(ROOT / "prompts")]
            + ["--store.url", str(store), *RUN],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def finish(job: subprocess.Popen, log: Path, since: int = 0) -> str:
    """The job's log after ``since`` characters, once it has ended as expected."""
    job.wait(timeout=600)
    text = log.read_text()[since:]
    assert job.returncode == 0 and "Traceback" not in text.split("GenPI results")[-1], text[-4000:]
    return text


def wait_for(job: subprocess.Popen, log: Path, what: str, found: Callable[[], list[Path]]) -> list[Path]:
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and job.poll() is None:
        if paths := found():
            return paths
        time.sleep(0.05)
    raise AssertionError(f"the job ended or timed out before {what}:\n{log.read_text()[-4000:]}")


def kill(job: subprocess.Popen) -> None:
    """SIGKILL the driver; its watchdog stops its local cluster's workers (waited for, so none writes on;
    Ray's node agents leave by themselves once they see their raylet gone)."""
    workers = [process for process, title in processes(job) if "Agent" not in title]
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=60)
    gone, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive, alive


def processes(job: subprocess.Popen) -> list[tuple[psutil.Process, str]]:
    """The job's processes with their titles (Ray's ``ray::<class>`` for its workers)."""
    found = []
    for process in psutil.Process(job.pid).children(recursive=True):
        try:
            found.append((process, (process.cmdline() or [""])[0]))
        except psutil.NoSuchProcess:
            continue
    return found


def files(store: Path) -> dict[str, bytes]:
    """Every stored file under prompts/ as the store lists it (a killed writer's temp file is none)."""
    from genpi.store import open_store

    opened = open_store(str(store))
    return {k: opened.get_bytes(k) for k in opened.list_keys("prompts") if k.rsplit("/", 1)[-1] not in TIMED}


def stamps(paths: list[Path]) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in paths}


@pytest.fixture(scope="module")
def reference(workspace: Path) -> Path:
    """One uninterrupted run of the batch."""
    store = workspace / "reference"
    finish(start(workspace, store, workspace / "reference.log"), workspace / "reference.log")
    return store


def test_killed_driver_and_worker_reruns_finish_with_the_same_artifacts(workspace: Path, reference: Path) -> None:
    store, log = workspace / "interrupted", workspace / "interrupted.log"
    prompts = store / "prompts"

    # 1. the driver killed mid-synthesis, after shell-agent's first part of outputs
    job = start(workspace, store, log)
    parts = wait_for(
        job, log, "a part of outputs", lambda: sorted(prompts.glob("shell-agent/*/synth/*/outputs/part-[!.]*"))
    )
    kill(job)
    kept = stamps(parts + sorted(prompts.glob("shell-agent/*/synth/*/inputs/[!.]*")))

    # 2. rerun; its training worker killed at a checkpoint, then the driver at a later one
    job = start(workspace, store, log)
    checkpoints = "shell-agent/*/train/*/ray/*/*/checkpoint_step-*/state.json"
    first = wait_for(job, log, "a training checkpoint", lambda: sorted(prompts.glob(checkpoints)))
    assert stamps(parts) == {p: t for p, t in kept.items() if p in parts}, "finished parts were written again"
    (worker,) = [process for process, title in processes(job) if title.startswith("ray::RayTrainWorker")]
    worker.kill()
    step = int(first[-1].parent.name.split("-")[1])
    later = wait_for(
        job,
        log,
        "a checkpoint of the restarted worker",
        lambda: [p for p in prompts.glob(checkpoints) if int(p.parent.name.split("-")[1]) > step + 2],
    )
    kill(job)
    assert stamps(list(kept)) == kept and "resumed at step" in log.read_text()  # the worker's restart
    synthesis_done = stamps(sorted(prompts.glob("shell-agent/*/synth/*/_SUCCESS")))
    assert synthesis_done and later

    # 3. rerun: training resumes from the newest checkpoint; the driver killed mid-evaluation
    before = len(log.read_text())
    job = start(workspace, store, log)
    episodes = wait_for(
        job, log, "evaluation episodes", lambda: sorted(prompts.glob("shell-agent/*/eval/*/episodes/[!.]*"))
    )
    kill(job)
    third = log.read_text()[before:]
    assert "[shell-agent] synthesis found at" in third and "starting engines" not in third
    resumed = re.search(r"resumed at step (\d+)/", third)
    assert resumed and int(resumed.group(1)) >= max(int(p.parent.name.split("-")[1]) for p in later)
    trained = stamps(sorted(prompts.glob("shell-agent/*/train/*/_SUCCESS")) + episodes)

    # 4. rerun: evaluation goes on from the stored episodes; nothing finished is redone
    before = len(log.read_text())
    fourth = finish(start(workspace, store, log), log, before)
    assert "[shell-agent] synthesis found at" in fourth and "[shell-agent] adapter found at" in fourth
    assert stamps(list(synthesis_done)) == synthesis_done and stamps(list(trained)) == trained
    assert not list(prompts.rglob("*.lease")) and not list(prompts.glob("*/*/train/*/ray"))
    assert files(store) == files(reference)
