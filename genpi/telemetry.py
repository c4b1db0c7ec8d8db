"""The job's metrics, through Ray's metrics API: the Ray dashboard and Prometheus show them.

Every metric is tagged by prompt (and stage, role or run), so a batch of many prompts can be
followed prompt by prompt. Outside a Ray process (unit tests, a plain script) recording is a
no-op. The Prometheus scrape config and a Grafana dashboard are in ``cluster/``.
"""

from __future__ import annotations

import functools
from typing import Any

STAGE_SECONDS = [10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400]


@functools.cache
def _metrics() -> dict[str, Any]:
    from ray.util.metrics import Counter, Gauge, Histogram

    return {
        "prompts": Counter(
            "genpi_prompts",
            "prompts that ended a batch, by outcome (published, gate_failed, failed)",
            tag_keys=("outcome",),
        ),
        "stage": Histogram(
            "genpi_stage_seconds",
            "wall time of one prompt's stage",
            boundaries=STAGE_SECONDS,
            tag_keys=("prompt", "stage"),
        ),
        "tokens": Counter("genpi_tokens_generated", "tokens the engines generated", tag_keys=("role", "model")),
        "loss": Gauge("genpi_train_loss", "training loss at the latest step", tag_keys=("prompt", "run")),
        "tokens_per_s": Gauge(
            "genpi_train_tokens_per_second",
            "supervised tokens per second of the latest step",
            tag_keys=("prompt", "run"),
        ),
        "step": Gauge("genpi_train_step", "optimizer steps done", tag_keys=("prompt", "run")),
        "fidelity": Gauge(
            "genpi_gate_fidelity",
            "the gate's figures on the test split (format retention, NLL gap closed)",
            tag_keys=("prompt", "metric"),
        ),
    }


def _ray_process() -> bool:
    import ray

    return ray.is_initialized()


def _record(name: str, method: str, value: float, tags: dict[str, str]) -> None:
    if _ray_process():
        getattr(_metrics()[name], method)(value, tags=tags)


def prompt_ended(outcome: str) -> None:
    """A prompt left the batch: ``published``, ``gate_failed`` or ``failed``."""
    _record("prompts", "inc", 1, {"outcome": outcome})


def stage_done(prompt: str, stage: str, seconds: float) -> None:
    _record("stage", "observe", seconds, {"prompt": prompt, "stage": stage})


def tokens_generated(role: str, model: str, count: int) -> None:
    if count:
        _record("tokens", "inc", count, {"role": role, "model": model})


def train_step(prompt: str, run: str, step: int, loss: float, tokens_per_s: float) -> None:
    tags = {"prompt": prompt, "run": run}
    _record("step", "set", step, tags)
    _record("loss", "set", loss, tags)
    _record("tokens_per_s", "set", tokens_per_s, tags)


def gate_figures(prompt: str, figures: dict[str, float | None]) -> None:
    for metric, value in figures.items():
        if value is not None:
            _record("fidelity", "set", value, {"prompt": prompt, "metric": metric})
