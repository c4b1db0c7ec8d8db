"""Running the job and the ``genpi`` command as a user would: a subprocess from the checkout."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.repo import ROOT

TINY_RUN = [
    "--profile",
    "local",
    "--ray.dashboard",
    "false",
    "--ray.num-cpus",
    "2",
    "--models.generator.name",
    "tiny-random-llama",
    "--models.target.name",
    "tiny-random-llama",
    "--models.generator.backend",
    "hf",
    "--models.target.backend",
    "hf",
    "--synth.num-inputs",
    "6",
    "--synth.min-inputs",
    "4",
    "--synth.part-size",
    "4",
    "--synth.max-turns",
    "2",
    "--synth.input-max-tokens",
    "48",
    "--synth.output-max-tokens",
    "12",
    "--synth.reason-max-tokens",
    "12",
    "--synth.agent-max-tokens",
    "12",
    "--synth.env-max-tokens",
    "12",
    "--synth.filter-off-format",
    "false",
    "--split.test-fraction",
    "0.3",  # 2 of the 6 records
    "--train.epochs",
    "1",
    "--train.min-steps",
    "0",
    "--train.batch-size",
    "4",
    "--train.micro-batch-size",
    "2",
    "--eval.max-turns",
    "2",
    "--eval.max-tokens",
    "12",
    "--eval.env-max-tokens",
    "12",
    "--eval.latency-turns",
    "2",
    "--eval.latency-tokens",
    "4",
]


def genpi_command(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "genpi.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def run_job(*args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "internalize.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# The same sizes as config overrides (``load_config(..., overrides=TINY_CONFIG)``), without the Ray flags.
TINY_CONFIG = {flag[2:].replace("-", "_"): value for flag, value in zip(TINY_RUN[6::2], TINY_RUN[7::2])}
