"""Ray actors that host engines, and a pool that splits a batch across a role's replicas."""

from __future__ import annotations

import dataclasses
from typing import Any

import ray

from genpi.config import ModelConfig
from genpi.engines.base import Conversation, Generation, SamplingParams


def build_engine(cfg: ModelConfig) -> Any:
    """The engine for one model role, on the configured backend."""
    if cfg.backend == "hf":
        from genpi.engines.hf import HFEngine

        return HFEngine(cfg.name, dtype=cfg.dtype, device=cfg.device, batch_size=cfg.batch_size,
                        max_context=cfg.max_context, threads=cfg.threads, prefix_sharing=cfg.prefix_sharing)
    raise ValueError(f"unknown backend {cfg.backend!r}")  # config validation lists the allowed ones


@ray.remote
class EngineActor:
    """Holds one loaded model for the life of a batch job."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.engine = build_engine(ModelConfig(**cfg))

    def info(self) -> dict[str, Any]:
        return {"model": self.engine.model_name, "max_context": self.engine.max_context}

    def generate(self, conversations: list[Conversation], params: SamplingParams,
                 adapters: list[str | None] | None = None) -> list[Generation]:
        return self.engine.generate(conversations, params, adapters)

    def add_adapter(self, folder: str) -> str:
        return self.engine.add_adapter(folder)

    def count_tokens(self, conversations: list[Conversation]) -> list[int]:
        return self.engine.count_tokens(conversations)


class EnginePool:
    """The replicas of one model role; calls block until every shard is done."""

    def __init__(self, cfg: ModelConfig, role: str) -> None:
        self.cfg, self.role = cfg, role
        options = {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus, "name": None}
        self.actors = [EngineActor.options(**options).remote(dataclasses.asdict(cfg))  # type: ignore[attr-defined]
                       for _ in range(cfg.replicas)]
        self.info = ray.get(self.actors[0].info.remote())  # surfaces load errors now, not mid-stage

    def _shards(self, items: list[Any]) -> list[tuple[int, int]]:
        n = len(self.actors)
        size = -(-len(items) // n) if items else 0
        return [(k * size, min(len(items), (k + 1) * size)) for k in range(n) if k * size < len(items)]

    def generate(self, conversations: list[Conversation], params: SamplingParams,
                 adapters: list[str | None] | None = None) -> list[Generation]:
        refs = [actor.generate.remote(conversations[a:b], params, adapters[a:b] if adapters else None)
                for actor, (a, b) in zip(self.actors, self._shards(conversations))]
        return [g for shard in ray.get(refs) for g in shard]

    def add_adapter(self, folder: str) -> str:
        """Load an adapter on every replica; returns its request name."""
        return ray.get([actor.add_adapter.remote(folder) for actor in self.actors])[0]

    def count_tokens(self, conversations: list[Conversation]) -> list[int]:
        refs = [actor.count_tokens.remote(conversations[a:b])
                for actor, (a, b) in zip(self.actors, self._shards(conversations))]
        return [n for shard in ray.get(refs) for n in shard]

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def start_pools(generator: ModelConfig, target: ModelConfig) -> tuple[EnginePool, EnginePool]:
    """Pools for both roles; one shared pool when both roles name the same model setup."""
    target_pool = EnginePool(target, "target")
    if dataclasses.asdict(generator) == dataclasses.asdict(target):
        return target_pool, target_pool
    return EnginePool(generator, "generator"), target_pool
