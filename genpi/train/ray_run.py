"""One adapter = one Ray Train (V2) run.

Each (prompt, run config) becomes a ``TorchTrainer`` with its own ``ScalingConfig`` (one worker
with the run's CPUs and GPUs). The worker runs the training stage; its checkpoints (each epoch and
every ``train.checkpoint_steps`` steps) are reported through ``ray.train.report`` into Ray Train's storage, which lives inside the artifact
store under the run (``{run}/ray/<attempt>/``, a folder per attempt; an S3 store reaches the workers as a
``pyarrow.fs.S3FileSystem`` with the configured endpoint). A worker that dies is restarted by
Ray Train (``train.max_failures`` times) and a job started again makes a new attempt; either resumes
from the newest complete checkpoint of any attempt in the store (not the one Ray Train registered
last, which may be older); a finished run is never redone.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from genpi import artifacts
from genpi.config import GenPIConfig, config_from_dict
from genpi.errors import GenPIError
from genpi.prompt.spec import PromptSpec
from genpi.store import ArtifactStore, store_for
from genpi.train.checkpoints import STATE_FILE, newest_usable

QUEUE_TIMEOUT_S = 7 * 24 * 3600  # how long a submitted run may wait for its CPUs/GPUs
_CHECKPOINT = re.compile(rf"/checkpoint_step-(\d+)/{re.escape(STATE_FILE)}$")


class RayTrainCheckpoints:
    """Checkpoints reported to Ray Train, found again in the store: every attempt's folder is
    searched, and the newest complete one wins (a restarted worker's too, since Ray Train may
    have registered an older one than the last it stored)."""

    def __init__(self, store: ArtifactStore, ray_prefix: str, scratch: Path) -> None:
        self.store, self.ray_prefix, self.scratch = store, ray_prefix, scratch

    def latest(self) -> Path | None:
        saved = [
            (int(m.group(1)), key.rsplit("/", 1)[0])
            for key in self.store.list_keys(self.ray_prefix)
            if (m := _CHECKPOINT.search(key))
        ]
        return newest_usable(self.store, saved, self.scratch)

    def save(self, folder: Path, step: int, metrics: dict[str, Any]) -> None:
        import ray.train

        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        ray.train.report(
            {**numbers, "step": step},
            checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
            checkpoint_dir_name=f"checkpoint_step-{step:06d}",
        )


def _train_loop(config: dict[str, Any]) -> None:
    """The worker side: the training stage, checkpointed through Ray Train."""
    from genpi.train.stage import train_prompt

    logging.basicConfig(level=logging.INFO, format="%(asctime)s genpi %(message)s")
    cfg = config_from_dict(config["cfg"])
    spec = PromptSpec.from_json(config["spec"])
    store = store_for(cfg.store)
    with tempfile.TemporaryDirectory(prefix="genpi-ray-ckpt-") as scratch:
        checkpoints = RayTrainCheckpoints(store, f"{artifacts.train_prefix(spec, cfg)}/ray", Path(scratch))
        train_prompt(spec, cfg, store, checkpoints=checkpoints)


def ray_storage(cfg: GenPIConfig, store: ArtifactStore, spec: PromptSpec, attempt: str) -> tuple[str, Any]:
    """Ray Train's ``storage_path`` and ``storage_filesystem`` for one attempt at a run: a folder of its
    own in the store (two attempts never share Ray Train's run state; a new one resumes from the
    checkpoints of any)."""
    prefix = f"{artifacts.train_prefix(spec, cfg)}/ray/{attempt}"
    if store.url.startswith("s3://"):
        from pyarrow import fs

        bucket_and_root = store.url[len("s3://") :].rstrip("/")
        options: dict[str, Any] = {}
        # pyarrow reads neither AWS_ENDPOINT_URL nor the AWS config's region the way boto3 does:
        # hand it the endpoint and region the store itself resolved.
        endpoint = cfg.store.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            options.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
        region = cfg.store.region or getattr(store, "region", None)
        if region:
            options["region"] = region
        return f"{bucket_and_root}/{prefix}", fs.S3FileSystem(**options)
    return str(Path(store.url).resolve() / prefix), None


def _genpi_cause(error: BaseException) -> GenPIError | None:
    """The GenPIError (a clear message about the user's input) behind a failed run, if any."""
    seen: list[BaseException] = list(getattr(error, "worker_failures", {}).values())
    while seen:
        failure = seen.pop()
        if hasattr(failure, "as_instanceof_cause"):
            failure = failure.as_instanceof_cause()
        if isinstance(failure, GenPIError):
            return failure
        seen.extend(e for e in (failure.__cause__, failure.__context__) if e is not None)
    return None


def fit_run(spec: PromptSpec, cfg: GenPIConfig, store: ArtifactStore, cpus: float, gpus: float) -> str:
    """Train ``spec``'s adapter as a Ray Train run (blocking); returns the run's store prefix."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    prefix = artifacts.train_prefix(spec, cfg)  # a finished run is skipped by the caller and by the stage
    # Runs are all submitted at once and queue for resources: a run waiting behind others must
    # not fail after Ray Train's default 60 s (the controller reads this from its launcher).
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(QUEUE_TIMEOUT_S))
    worker_cfg = cfg.to_dict()
    worker_cfg["store"]["url"] = store.url
    storage_path, filesystem = ray_storage(cfg, store, spec, f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}")
    resources = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"cfg": worker_cfg, "spec": spec.to_json()},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=bool(gpus), resources_per_worker=resources),
        run_config=RunConfig(
            name=f"{spec.name}-{artifacts.run_hash(cfg)[:12]}",
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
    )
    try:
        trainer.fit()
    except TrainingFailedError as e:
        raise _genpi_cause(e) or e from None
    if not store.is_done(prefix):
        raise RuntimeError(f"[{spec.name}] the Ray Train run ended without an adapter at {store.location(prefix)}")
    store.delete_prefix(f"{prefix}/ray")  # its checkpoints: the adapter is stored and the run is done
    return prefix
