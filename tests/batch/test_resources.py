"""What a batch's training and evaluation tasks ask of the cluster."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from genpi.batch.stages import Batch
from genpi.config import load_config
from genpi.errors import ConfigError
from genpi.store import open_store


def test_tasks_are_sized_by_the_cluster_as_it_is_when_they_start(tmp_path: Path, monkeypatch) -> None:
    cluster = {"CPU": 2.0}
    monkeypatch.setattr(ray, "cluster_resources", lambda: dict(cluster))
    cfg = load_config("local", overrides={"train.num_cpus": 3, "eval.num_cpus": 1})
    batch = Batch(cfg, open_store(str(tmp_path)), runs=[])
    assert batch.resources("train") == (2.0, 0.0)  # never more than the cluster has: it would wait forever
    cluster["CPU"] = 5.0  # a node joined (an autoscaler, or `ray start --address` after the job began)
    assert batch.resources("train") == (3.0, 0.0) and batch.resources("eval") == (1.0, 0.0)
    cfg.eval.num_gpus = 1
    with pytest.raises(ConfigError, match=r"eval.num_gpus.*no GPUs"):
        batch.resources("eval")
