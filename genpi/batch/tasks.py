"""The Ray tasks of a batch: one training run, one selection, one evaluation (each opens the store anew)."""

from __future__ import annotations

import logging
from typing import Any

import ray

from genpi.config import config_from_dict
from genpi.prompt.spec import PromptSpec
from genpi.store import store_for

LOG_FORMAT = "%(asctime)s genpi %(message)s"


@ray.remote(num_cpus=0)
def train_run(spec_json: dict[str, Any], cfg_dict: dict[str, Any], cpus: float, gpus: float) -> str:
    """Launches one Ray Train run and waits for it (the run's worker holds the resources)."""
    from genpi.train.ray_run import fit_run

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    cfg = config_from_dict(cfg_dict)
    return fit_run(PromptSpec.from_json(spec_json), cfg, store_for(cfg.store), cpus, gpus)


@ray.remote
def select_task(spec_json: dict[str, Any], run_dicts: list[dict[str, Any]]) -> dict:
    from genpi.evaluate.selection import select_run

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    runs = [config_from_dict(r) for r in run_dicts]
    return select_run(PromptSpec.from_json(spec_json), runs, store_for(runs[0].store))


@ray.remote
def evaluate_task(spec_json: dict[str, Any], cfg_dict: dict[str, Any], real_inputs: list[str]) -> dict:
    from genpi.evaluate.stage import evaluate_prompt

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    cfg = config_from_dict(cfg_dict)
    return evaluate_prompt(PromptSpec.from_json(spec_json), cfg, store_for(cfg.store), real_inputs)
