"""Ray actors that host engines, and a pool that splits a batch across a role's replicas.

An engine actor whose process dies (out of memory, a killed node, a crashed kernel) is started
again by Ray and its unfinished calls are retried, up to ``models.<role>.restarts`` times; calls
are pure functions of their arguments, so a retried call gives the same replies. Beyond that the
pool raises :class:`EngineError` and the caller starts new pools for the prompts still to do.
A request names its adapter by folder, and an actor loads a folder it has not seen on first use,
so a restarted actor serves the same adapters without being told again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from typing import Any

import ray

from genpi import telemetry
from genpi.config import ModelConfig
from genpi.engines.backends import build_engine
from genpi.engines.base import Conversation, Generation, SamplingParams
from genpi.engines.environments import engine_runtime_env
from genpi.errors import EngineError, ModelError

log = logging.getLogger("genpi")


@ray.remote
class EngineActor:
    """Holds one loaded model for the life of a batch job."""

    def __init__(self, cfg: dict[str, Any], role: str) -> None:
        self.engine, self.role = build_engine(ModelConfig(**cfg)), role
        with warnings.catch_warnings():  # Ray warns about an API its own property uses
            warnings.simplefilter("ignore", DeprecationWarning)
            restarted = ray.get_runtime_context().was_current_actor_reconstructed
        if restarted:
            log.warning(
                "engine actor for %s restarted after its process died (pid %d now); unfinished calls are retried",
                cfg["name"],
                os.getpid(),
            )

    def info(self) -> dict[str, Any]:
        return {"model": self.engine.model_name, "max_context": self.engine.max_context, "pid": os.getpid()}

    def generate(
        self, conversations: list[Conversation], params: SamplingParams, adapters: list[str | None] | None = None
    ) -> list[Generation]:
        for folder in dict.fromkeys(adapters or []):
            if folder is not None:
                self.engine.add_adapter(folder)  # loads each folder once
        replies = self.engine.generate(conversations, params, adapters)
        telemetry.tokens_generated(self.role, self.engine.model_name, sum(g.output_tokens for g in replies))
        return replies

    def add_adapter(self, folder: str) -> str:
        return self.engine.add_adapter(folder)

    def count_tokens(self, conversations: list[Conversation]) -> list[int]:
        return self.engine.count_tokens(conversations)


class EnginePool:
    """The replicas of one model role; calls block until every shard is done."""

    def __init__(self, cfg: ModelConfig, role: str) -> None:
        self.cfg, self.role = cfg, role
        self.hangs = 0  # replicas killed for not answering, counted against the restarts
        options = {
            "num_cpus": cfg.num_cpus,
            "num_gpus": cfg.num_gpus,
            "name": None,
            "runtime_env": engine_runtime_env(cfg.backend, cfg.python),
            "max_restarts": cfg.restarts,
            "max_task_retries": cfg.restarts,
        }
        self.actors = [
            EngineActor.options(**options).remote(dataclasses.asdict(cfg), role)  # type: ignore[attr-defined]
            for _ in range(cfg.replicas)
        ]
        self.info = self._get([actor.info.remote() for actor in self.actors])[0]  # load errors now, not mid-stage

    def _get(self, refs: list[Any]) -> list[Any]:
        """The results of calls made on ``self.actors[:len(refs)]``, in order. An actor that does not
        answer within ``call_timeout_s`` is hung: it is killed, Ray restarts it and retries the call."""
        which = f"the {self.role} engine ({self.cfg.name}, backend {self.cfg.backend})"
        hangs = 0
        while True:
            try:
                return ray.get(refs, timeout=self.cfg.call_timeout_s or None)
            except ray.exceptions.GetTimeoutError:
                hangs += 1
                if hangs > self.cfg.restarts:
                    raise EngineError(
                        f"{which} did not answer within {self.cfg.call_timeout_s:g} s "
                        f"(models.{self.role}.call_timeout_s), {hangs} times; it was restarted "
                        f"{self.cfg.restarts} times (models.{self.role}.restarts)"
                    ) from None
                _, waiting = ray.wait(refs, num_returns=len(refs), timeout=0)
                hung = [actor for actor, ref in zip(self.actors, refs) if ref in waiting]
                log.warning(
                    "%s: %d replica(s) gave no answer within %g s; restarting them (%d of %d)",
                    which,
                    len(hung),
                    self.cfg.call_timeout_s,
                    hangs,
                    self.cfg.restarts,
                )
                self.hangs += 1
                for actor in hung:
                    ray.kill(actor, no_restart=False)  # Ray starts it again and retries its calls
                # The clock starts again once they are back (loading the model is not the call's time).
                restarted = [actor.info.remote() for actor in hung]
                if ray.wait(restarted, num_returns=len(restarted), timeout=self.cfg.call_timeout_s)[1]:
                    raise EngineError(
                        f"{which} did not come back within {self.cfg.call_timeout_s:g} s of a restart "
                        f"(models.{self.role}.call_timeout_s)"
                    ) from None
            except ray.exceptions.RayActorError as e:
                lines = [line.strip() for line in str(e).splitlines() if line.strip()]
                if e.actor_init_failed:  # the model or its settings, not the machine: the error says which
                    raise ModelError(f"{which} could not start: {lines[-1]}") from None
                if self.hangs:
                    raise EngineError(
                        f"{which} stopped answering: it gave no answer within {self.cfg.call_timeout_s:g} s "
                        f"(models.{self.role}.call_timeout_s) {self.hangs} times, was killed each time, "
                        f"and is out of restarts (models.{self.role}.restarts is {self.cfg.restarts})"
                    ) from None
                raise EngineError(
                    f"{which} died and was restarted {self.cfg.restarts} times "
                    f"(models.{self.role}.restarts); last cause: {lines[0]}"
                ) from None

    def _shards(self, items: list[Any]) -> list[tuple[int, int]]:
        n = len(self.actors)
        size = -(-len(items) // n) if items else 0
        return [(k * size, min(len(items), (k + 1) * size)) for k in range(n) if k * size < len(items)]

    def generate(
        self, conversations: list[Conversation], params: SamplingParams, adapters: list[str | None] | None = None
    ) -> list[Generation]:
        refs = [
            actor.generate.remote(conversations[a:b], params, adapters[a:b] if adapters else None)
            for actor, (a, b) in zip(self.actors, self._shards(conversations))
        ]
        return [g for shard in self._get(refs) for g in shard]

    def add_adapter(self, folder: str) -> str:
        """Load an adapter on every replica; returns its request name."""
        return self._get([actor.add_adapter.remote(folder) for actor in self.actors])[0]

    def count_tokens(self, conversations: list[Conversation]) -> list[int]:
        refs = [
            actor.count_tokens.remote(conversations[a:b])
            for actor, (a, b) in zip(self.actors, self._shards(conversations))
        ]
        return [n for shard in self._get(refs) for n in shard]

    def pids(self) -> list[int]:
        """The process id of each replica (a restarted replica has a new one)."""
        return [info["pid"] for info in self._get([actor.info.remote() for actor in self.actors])]

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def fit_engine_cpus(
    generator: ModelConfig, target: ModelConfig, cluster_cpus: float
) -> tuple[ModelConfig, ModelConfig]:
    """Both roles' engine actors, with CPU reservations scaled down by one factor where together
    they ask for more CPUs than the cluster has (the last actor would otherwise wait forever).
    An engine's torch threads follow its reservation."""
    shared = dataclasses.asdict(generator) == dataclasses.asdict(target)
    wanted = target.num_cpus * target.replicas + (0 if shared else generator.num_cpus * generator.replicas)
    if wanted <= cluster_cpus or not wanted:
        return generator, target
    scale = cluster_cpus / wanted
    log.warning(
        "the engines ask for %g CPUs and the cluster has %g: each engine actor gets %.0f%% of its "
        "models.<role>.num_cpus",
        wanted,
        cluster_cpus,
        100 * scale,
    )
    return (
        dataclasses.replace(generator, num_cpus=generator.num_cpus * scale),
        dataclasses.replace(target, num_cpus=target.num_cpus * scale),
    )


def start_pools(generator: ModelConfig, target: ModelConfig) -> tuple[EnginePool, EnginePool]:
    """Pools for both roles, sized to fit the cluster together; one shared pool when both roles
    name the same model setup."""
    generator, target = fit_engine_cpus(generator, target, ray.cluster_resources().get("CPU", 1.0))
    target_pool = EnginePool(target, "target")
    if dataclasses.asdict(generator) == dataclasses.asdict(target):  # one scale keeps equal setups equal
        return target_pool, target_pool
    return EnginePool(generator, "generator"), target_pool
