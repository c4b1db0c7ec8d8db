"""Training checkpoints: the state a run needs to resume exactly, and where it is kept.

A checkpoint is one folder holding ``state.pt``: the LoRA weights, the optimizer state, the
Python and torch RNG states, the epoch and step reached and the loss history. The learning rate
is a function of the step (:func:`genpi.train.trainer.lr_factor`), so the step is the
scheduler's state. Where checkpoints live is a :class:`Checkpoints`: a folder in the artifact
store (:class:`StoreCheckpoints`), or Ray Train's own storage (:mod:`genpi.train.ray_run`).
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch

from genpi.errors import GenPIError
from genpi.store import ArtifactStore
from genpi.store.base import file_digest

STATE_FILE = "state.pt"
DIGEST_FILE = "state.json"  # sha256 and size of state.pt: a checkpoint cut or changed in the store is not resumed
log = logging.getLogger(__name__)


class Checkpoints(Protocol):
    """Where a run's checkpoints are saved and found."""

    def latest(self) -> Path | None:
        """A local folder holding the newest checkpoint, or None."""

    def save(self, folder: Path, epoch: int, metrics: dict[str, Any]) -> None:
        """Keep the checkpoint in ``folder`` (written after ``epoch`` epochs)."""


def save_state(
    folder: Path,
    model: Any,
    optimizer: torch.optim.Optimizer,
    rng: random.Random,
    epoch: int,
    step: int,
    history: list[dict[str, float]],
) -> None:
    """Write everything a resumed run needs into ``folder``."""
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
        log.warning("%s; training starts over", problem)
        return None
    return folder


def load_state(
    folder: Path, model: Any, optimizer: torch.optim.Optimizer, rng: random.Random
) -> tuple[int, int, list[dict[str, float]]]:
    """Restore a saved state in place; returns (epochs done, steps done, loss history)."""
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
    return state["epoch"], state["step"], state["history"]


class StoreCheckpoints:
    """Checkpoints under ``{prefix}/epoch-NNNN/`` in the artifact store; only the newest is kept."""

    def __init__(self, store: ArtifactStore, prefix: str, scratch: Path) -> None:
        self.store, self.prefix, self.scratch = store, prefix, scratch

    def _epochs(self) -> list[int]:
        names = {key[len(self.prefix) + 1 :].split("/", 1)[0] for key in self.store.list_keys(self.prefix)}
        return sorted(
            int(n.split("-")[1])
            for n in names
            if n.startswith("epoch-") and self.store.exists(f"{self.prefix}/{n}/{STATE_FILE}")
        )

    def latest(self) -> Path | None:
        epochs = self._epochs()
        if not epochs:
            return None
        folder = self.scratch / f"epoch-{epochs[-1]:04d}"
        shutil.rmtree(folder, ignore_errors=True)
        self.store.download_dir(f"{self.prefix}/epoch-{epochs[-1]:04d}", folder)
        return usable(folder)

    def save(self, folder: Path, epoch: int, metrics: dict[str, Any]) -> None:
        older = self._epochs()
        self.store.upload_dir(folder, f"{self.prefix}/epoch-{epoch:04d}")
        for old in older:
            if old != epoch:
                self.store.delete_prefix(f"{self.prefix}/epoch-{old:04d}")
