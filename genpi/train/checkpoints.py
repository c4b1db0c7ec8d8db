"""Training checkpoints: the state a run needs to resume exactly, and where it is kept.

A checkpoint is one folder holding ``state.pt``: the LoRA weights, the optimizer state, the
Python and torch RNG states, the epochs and steps done, the loss history and, when it was written
inside an epoch (``train.checkpoint_steps``), that epoch's record order. The learning rate is a
function of the step (:func:`genpi.train.trainer.lr_factor`), so the step is the scheduler's
state. Where checkpoints live is a :class:`Checkpoints`: a folder in the artifact store
(:class:`StoreCheckpoints`), or Ray Train's storage inside it (:mod:`genpi.train.ray_run`); either
way a run resumes from the newest checkpoint that matches its digest.
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from genpi.errors import ArtifactNotFound, GenPIError
from genpi.store import ArtifactStore
from genpi.store.base import file_digest

STATE_FILE = "state.pt"
DIGEST_FILE = "state.json"  # sha256 and size of state.pt: a checkpoint cut or changed in the store is not resumed
log = logging.getLogger(__name__)


class Checkpoints(Protocol):
    """Where a run's checkpoints are saved and found."""

    def latest(self) -> Path | None:
        """A local folder holding the newest checkpoint, or None."""

    def save(self, folder: Path, step: int, metrics: dict[str, Any]) -> None:
        """Keep the checkpoint in ``folder`` (written after ``step`` optimizer steps)."""


@dataclass
class Progress:
    """Where a saved run stood: epochs and steps done, the loss history and, for a checkpoint
    written inside an epoch, that epoch's record order (its steps so far are done)."""

    epoch: int
    step: int
    history: list[dict[str, float]]
    order: list[int] | None = None


def save_state(
    folder: Path,
    model: Any,
    optimizer: torch.optim.Optimizer,
    rng: random.Random,
    epoch: int,
    step: int,
    history: list[dict[str, float]],
    order: list[int] | None = None,
) -> None:
    """Write everything a resumed run needs into ``folder`` (``order``: the record order of the
    epoch in progress, for a checkpoint inside it)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "lora": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
            "optimizer": optimizer.state_dict(),
            "python_rng": rng.getstate(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "epoch": epoch,
            "step": step,
            "history": history,
            "order": order,
        },
        folder / STATE_FILE,
    )
    (folder / DIGEST_FILE).write_text(json.dumps(file_digest((folder / STATE_FILE).read_bytes())))


def state_problem(folder: Path) -> str | None:
    """Why the checkpoint in ``folder`` must not be resumed (it does not match its digest), or None."""
    try:
        expected = json.loads((folder / DIGEST_FILE).read_text())
        actual = file_digest((folder / STATE_FILE).read_bytes())
    except (OSError, ValueError) as e:
        return f"checkpoint {folder} is incomplete ({e})"
    if actual != expected:
        return (
            f"checkpoint {folder / STATE_FILE} does not match its digest ({actual['size']} bytes, recorded "
            f"{expected.get('size') if isinstance(expected, dict) else '?'})"
        )
    return None


def usable(folder: Path | None) -> Path | None:
    """``folder`` when it holds a checkpoint that matches its digest; else None, with a warning."""
    if folder is None:
        return None
    problem = state_problem(folder)
    if problem:
        log.warning("%s; not resumed from it", problem)
        return None
    return folder


def newest_usable(store: ArtifactStore, saved: Iterable[tuple[int, str]], scratch: Path) -> Path | None:
    """The newest of the ``saved`` (steps done, store prefix) checkpoints that matches its digest,
    downloaded below ``scratch``: one cut by a killed writer is passed over for the one before it."""
    for step, prefix in sorted(saved, reverse=True):
        folder = scratch / f"step-{step:06d}"
        shutil.rmtree(folder, ignore_errors=True)
        try:
            found = usable(store.download_dir(prefix, folder))
        except ArtifactNotFound:  # deleted meanwhile (a newer one was kept)
            continue
        if found is not None:
            return found
    return None


def load_state(folder: Path, model: Any, optimizer: torch.optim.Optimizer, rng: random.Random) -> Progress:
    """Restore a saved state in place; returns where the run stood."""
    problem = state_problem(folder)
    if problem:
        raise GenPIError(f"{problem}; delete the run's checkpoints and rerun")
    try:  # tensors and plain data only: whoever can write the store must not run code here
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise GenPIError(
            f"{folder / STATE_FILE} is not a checkpoint genpi wrote ({str(e)[:200]}); "
            "delete the run's checkpoints and rerun"
        ) from None
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["lora"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    rng.setstate(state["python_rng"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return Progress(state["epoch"], state["step"], state["history"], state.get("order"))


class StoreCheckpoints:
    """Checkpoints under ``{prefix}/step-NNNNNN/`` in the artifact store; only the newest is kept."""

    def __init__(self, store: ArtifactStore, prefix: str, scratch: Path) -> None:
        self.store, self.prefix, self.scratch = store, prefix, scratch

    def _steps(self) -> list[int]:
        names = {key[len(self.prefix) + 1 :].split("/", 1)[0] for key in self.store.list_keys(self.prefix)}
        return sorted(
            int(n.split("-")[1])
            for n in names
            if n.startswith("step-") and self.store.exists(f"{self.prefix}/{n}/{STATE_FILE}")
        )

    def latest(self) -> Path | None:
        return newest_usable(self.store, [(s, f"{self.prefix}/step-{s:06d}") for s in self._steps()], self.scratch)

    def save(self, folder: Path, step: int, metrics: dict[str, Any]) -> None:
        older = self._steps()
        self.store.upload_dir(folder, f"{self.prefix}/step-{step:06d}")
        for old in older:
            if old != step:
                self.store.delete_prefix(f"{self.prefix}/step-{old:06d}")
