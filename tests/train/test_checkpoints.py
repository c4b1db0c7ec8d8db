"""Trust: a checkpoint from the store is data, never code."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

from genpi.errors import GenPIError
from genpi.store.base import file_digest
from genpi.train.checkpoints import DIGEST_FILE, STATE_FILE, Progress, load_state, save_state, usable


def _model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_a_checkpoint_round_trips_without_pickled_code(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer()
    rng = random.Random(3)
    save_state(tmp_path, model, optimizer, rng, epoch=2, step=7, history=[{"loss": 1.5}])
    expected_next = rng.random()
    fresh = torch.nn.Linear(3, 2)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    fresh_rng = random.Random(0)
    assert load_state(tmp_path, fresh, fresh_optimizer, fresh_rng) == Progress(2, 7, [{"loss": 1.5}], None)
    assert torch.equal(fresh.weight, model.weight) and fresh_rng.random() == expected_next
    assert fresh_optimizer.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]


class _Planted:
    def __reduce__(self):
        return (os.system, (f"touch {self.flag}",))


def test_a_planted_pickle_in_a_checkpoint_does_not_run(tmp_path: Path) -> None:
    flag = tmp_path / "ran"
    planted = _Planted()
    planted.flag = flag
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    torch.save({"lora": {}, "optimizer": planted, "epoch": 1}, folder / STATE_FILE)
    # whoever can write the store can write the digest too
    (folder / DIGEST_FILE).write_text(json.dumps(file_digest((folder / STATE_FILE).read_bytes())))
    model, optimizer = _model_and_optimizer()
    with pytest.raises(GenPIError, match=STATE_FILE):
        load_state(folder, model, optimizer, random.Random(0))
    assert not flag.exists()


def test_a_cut_checkpoint_is_not_resumed(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer()
    save_state(tmp_path, model, optimizer, random.Random(0), epoch=1, step=1, history=[])
    assert usable(tmp_path) == tmp_path
    data = (tmp_path / STATE_FILE).read_bytes()
    (tmp_path / STATE_FILE).write_bytes(data[: len(data) // 2])
    assert usable(tmp_path) is None  # training starts over instead of failing on every rerun
    with pytest.raises(GenPIError, match="does not match its digest"):
        load_state(tmp_path, model, optimizer, random.Random(0))


def test_resume_takes_the_newest_complete_checkpoint_of_any_attempt(tmp_path: Path) -> None:
    """A killed driver leaves checkpoints of several attempts, the newest possibly cut mid-upload:
    the run resumes from the newest one that matches its digest, not the first or a registered one."""
    from genpi.store import LocalStore
    from genpi.train.ray_run import RayTrainCheckpoints

    store = LocalStore(tmp_path / "store")
    model, optimizer = _model_and_optimizer()
    for attempt, step in (("20260101T000000-a", 2), ("20260101T000100-b", 4), ("20260101T000100-b", 6)):
        local = tmp_path / f"state-{step}"
        save_state(local, model, optimizer, random.Random(0), epoch=step // 2, step=step, history=[])
        store.upload_dir(local, f"run/ray/{attempt}/genpi-run/checkpoint_step-{step:06d}")
    cut = f"run/ray/20260101T000100-b/genpi-run/checkpoint_step-000006/{STATE_FILE}"
    store.put_bytes(cut, store.get_bytes(cut)[:100])
    found = RayTrainCheckpoints(store, "run/ray", tmp_path / "scratch").latest()
    assert found is not None and load_state(found, model, optimizer, random.Random(0)).step == 4
    assert RayTrainCheckpoints(store, "other/ray", tmp_path / "scratch").latest() is None  # a new run
