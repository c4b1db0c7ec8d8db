"""What a batch's stages hold: the shared engine pools of synthesis, and the Ray reservations of tasks."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray

from genpi.config import GenPIConfig
from genpi.errors import ConfigError, EngineError

log = logging.getLogger(__name__)


class SharedEngines:
    """The batch's generator and target pools: started by the first synthesis that asks for them,
    shared by every prompt's synthesis, and shut down by :meth:`close` after the last.

    A synthesis that fails with an :class:`EngineError` (an engine out of restarts) retires the
    pools it used: the next synthesis gets fresh ones, and the old ones are shut down once no
    synthesis uses them any more."""

    def __init__(self, cfg: GenPIConfig) -> None:
        self.cfg = cfg
        self._lock = threading.Lock()
        self._current: tuple[Any, Any] | None = None
        self._users: dict[int, int] = {}  # id(pools) -> syntheses using them
        self._retired: dict[int, tuple[Any, Any]] = {}

    @contextmanager
    def pools(self) -> Iterator[tuple[Any, Any]]:
        """The (generator, target) pools for one synthesis."""
        with self._lock:
            if self._current is None:
                from genpi.engines.actors import start_pools

                models = self.cfg.models
                log.info("starting engines: generator %s, target %s", models.generator.name, models.target.name)
                self._current = start_pools(models.generator, models.target)
            pools = self._current
            self._users[id(pools)] = self._users.get(id(pools), 0) + 1
        try:
            yield pools
        except EngineError:
            with self._lock:
                if self._current is pools:  # out of restarts: fresh engines for the prompts left
                    log.info("starting new engines for the prompts left")
                    self._current = None
                    self._retired[id(pools)] = pools
            raise
        finally:
            with self._lock:
                self._users[id(pools)] -= 1
                if not self._users[id(pools)] and id(pools) in self._retired:
                    _shutdown(self._retired.pop(id(pools)))

    def close(self) -> None:
        """Shut down every pool (the last synthesis has ended)."""
        with self._lock:
            for pools in [*self._retired.values(), *([self._current] if self._current else [])]:
                _shutdown(pools)
            self._current, self._retired = None, {}


def _shutdown(pools: tuple[Any, Any]) -> None:
    for pool in {id(p): p for p in pools}.values():  # one pool when both roles share it
        pool.shutdown()


def task_resources(section: str, num_cpus: float, num_gpus: float) -> tuple[float, float]:
    """What a stage's tasks may ask for: never more CPUs than the cluster has (the task would wait
    forever), and GPUs only where the cluster has them, else a clear error before waiting."""
    cluster = ray.cluster_resources()
    if num_gpus and not cluster.get("GPU"):
        raise ConfigError(
            f"config '{section}.num_gpus' is {num_gpus:g} but the Ray cluster has no GPUs; "
            f"set {section}.num_gpus 0 (or use --profile local / auto on a CPU-only cluster)"
        )
    return min(num_cpus, cluster.get("CPU", 1.0)), num_gpus
