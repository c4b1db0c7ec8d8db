"""The hf model deployment: a replica holds one HFEngine (the base model once) and what it serves
(:mod:`genpi.serve.replica`: loading, refusing, unloading).

Adapters and prompts' pinned KV caches are freed on eviction (PEFT weights, the KV kept for its
conversations). Requests go through the :class:`Batcher`'s engine thread; a prompt in prompt mode
has its KV computed once and kept. The model, dtype, device, batch size and context come from
``models.target``; ``serve.backend`` vllm holds vLLM instead (:mod:`genpi.serve.vllm_deployment`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ray import serve

from genpi import parity
from genpi.config import GenPIConfig
from genpi.engines.base import SamplingParams
from genpi.engines.hf import HFEngine
from genpi.prompt.spec import PromptSpec
from genpi.registry import PublishedAdapter
from genpi.serve.batcher import Batcher, Job, TextStream
from genpi.serve.catalog import NO_PROBES
from genpi.serve.fallback import prefix_ids
from genpi.serve.replica import Event, Held, Rejected, Replica


def serving_engine(cfg: GenPIConfig, dtype: str | None = None) -> HFEngine:
    """The engine a replica serves with (``dtype`` other than the target's: a parity checker, no
    turn cache, no merged copies: it checks the adapter's own factors)."""
    target, threads = cfg.models.target, cfg.models.target.threads or max(1, int(cfg.serve.num_cpus))
    return HFEngine(
        target.name,
        dtype=dtype or target.dtype,
        device=target.device,
        batch_size=target.batch_size,
        max_context=target.max_context,
        threads=threads,
        prefix_sharing=target.prefix_sharing,
        turn_cache_mib=0 if dtype else 2048,
        max_merged=0 if dtype else cfg.serve.merged_adapters,
    )


class ParityChecker:
    """Runs versions' parity checks for one replica.

    Probes were answered in float32; a replica in another dtype checks on a float32 twin of its
    model. On CPU the twin is kept between checks (host memory; a newly published version is then
    checked within seconds), on a GPU it is built per check and dropped. The base model's answers
    to a probe are kept either way."""

    def __init__(self, cfg: GenPIConfig, engine: HFEngine) -> None:
        self.cfg, self.engine = cfg, engine
        self.twins: dict[str, HFEngine] = {}
        self.base_replies: dict[str, dict[str, str]] = {}  # dtype -> probe -> the base model's answer

    def check(self, entry: PublishedAdapter, folder: Path) -> str:
        """The version's check outcome (``passed`` or unchecked), or Rejected saying why."""
        if not entry.probes:
            return NO_PROBES
        dtype = entry.probes[0].get("dtype", parity.PROBE_DTYPE)
        checker = self.engine if dtype == self.cfg.models.target.dtype else self._twin(dtype)
        name = checker.add_adapter(folder)
        try:
            why = parity.verdict(checker, name, entry.probes, self.base_replies.setdefault(dtype, {}))
        finally:
            if checker is not self.engine:
                checker.remove_adapter(name)
        if why and checker is self.engine:
            self.engine.remove_adapter(name)
        if why:
            raise Rejected(why)
        return "passed"

    def _twin(self, dtype: str) -> HFEngine:
        twin = self.twins.get(dtype) or serving_engine(self.cfg, dtype)
        if str(twin.model.device) == "cpu":
            self.twins[dtype] = twin
        return twin


@serve.deployment
class ModelServer(Replica):
    """One hf model replica (see the module docstring)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        super().__init__(settings)
        self.engine = serving_engine(self.cfg)
        self.checker = ParityChecker(self.cfg, self.engine)
        self.batcher = Batcher(self.engine, self.cfg.serve.batch_window_ms / 1000, self.engine.batch_size, self._tidy)

    async def _hold_prompt(self, key: str, spec: PromptSpec) -> Held:
        def pin() -> Held:
            ids = prefix_ids(self.engine.tokenizer, spec)
            return Held(self, key, spec.name, "prompt", pinned=self.engine.keep_prefix(ids), prefix=len(ids))

        return await self.batcher.call(pin)

    async def _admit(self, entry: PublishedAdapter, folder: Path) -> tuple[str, str]:
        outcome = await self.batcher.call(lambda: self.checker.check(entry, folder))
        return outcome, await self.batcher.call(lambda: self.engine.add_adapter(folder))

    def _free(self, held: Held) -> None:
        """On the engine's thread: the prompt's KV, and every adapter nothing holds."""
        if held.pinned is not None:
            self.batcher.queue.put((lambda: self.engine.release_prefix(held.pinned), Future()))
        self.batcher.queue.put((self._tidy, Future()))

    def _tidy(self) -> None:
        """Unload every adapter nothing holds (on the engine's thread)."""
        wanted = {h.adapter for h in list(self.held.values())}
        for name in [a for a in self.engine.adapters if a not in wanted]:
            self.engine.remove_adapter(name)

    async def _answer(self, held: Held, request: dict[str, Any]) -> AsyncIterator[Event]:
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        extra = {"parity": held.parity, "cached_tokens": held.prefix}
        params = SamplingParams(**{**request["params"], "stop": tuple(request["params"]["stop"])})
        job = Job(
            request["messages"],
            params,
            held.adapter,
            lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
            TextStream(self.engine.tokenizer, tuple(request["params"]["stop"])) if request["stream"] else None,
            extra,
        )
        self.batcher.submit(job)
        while True:
            event = await events.get()
            yield event
            if "delta" not in event:
                return

    def stats(self) -> dict[str, Any]:
        """What this replica holds now (tests and benchmarks read it)."""
        return self._stats(len(self.engine.adapters), self.batcher.batches)

    def __del__(self) -> None:
        if (batcher := getattr(self, "batcher", None)) is not None:  # None when __init__ failed
            batcher.stop()
