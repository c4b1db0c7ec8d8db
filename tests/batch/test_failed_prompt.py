"""A prompt's failure inside a Ray task is recorded as the user's one-line message."""

from __future__ import annotations

import ray

from genpi.batch.graph import fail
from genpi.batch.manifest import PromptResult
from genpi.errors import PromptError


def test_a_clear_error_from_a_ray_task_is_recorded_without_its_remote_traceback() -> None:
    cause = PromptError("prompts/long.md: the prompt is 2,213 tokens ...; raise train.max_seq_len")
    remote = ray.exceptions.RayTaskError("train_run", 'Traceback (most recent call last):\n  File "x.py"', cause)
    result = PromptResult("long", "hash")
    fail(result, "training", remote.as_instanceof_cause())  # what ray.get raises
    assert (result.status, result.stage, result.error) == ("failed", "training", str(cause))
    other = PromptResult("other", "hash")
    fail(other, "training", ray.exceptions.RayTaskError("train_run", "Traceback ...", ValueError("bad")))
    assert "ValueError" in other.error  # not a GenPIError: named with its type, the traceback kept for debugging
