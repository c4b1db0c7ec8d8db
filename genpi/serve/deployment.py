"""The model deployment: a replica holds one engine (the base model once) and what it serves.

What a replica holds is keyed by the multiplexed model id (:attr:`Catalog.Target.key`), so Ray
Serve routes a request to a replica that already holds its adapter (without pinning it there:
a busy replica's requests go elsewhere and load it there too). At most ``serve.max_adapters``
are held; past that Serve unloads the least recently used, and the replica frees its memory
(PEFT weights, the KV kept for its conversations). Loading an adapter downloads it from the
store, checks its files against the manifest's digests and runs the parity check
(:mod:`genpi.parity`); a version that fails is refused, with the reason, and never served.
Loading a prompt (prompt mode) computes its KV once and keeps it.

The engine is the hf backend, whatever ``models.target.backend`` says (the model, dtype, device,
batch size and context come from ``models.target``): vLLM's engine lives in another environment,
where Ray Serve does not import.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ray import serve

from genpi import parity, registry
from genpi.config import GenPIConfig, config_from_dict
from genpi.engines.base import SamplingParams
from genpi.engines.hf import HFEngine
from genpi.errors import GenPIError
from genpi.prompt.spec import PromptSpec
from genpi.registry import PublishedAdapter
from genpi.serve.batcher import Batcher, Job, TextStream
from genpi.serve.catalog import NO_PROBES
from genpi.serve.fallback import prefix_ids
from genpi.serve.metrics import ReplicaMetrics
from genpi.store import store_for

log = logging.getLogger(__name__)


class Rejected(GenPIError):
    """A published version this replica will not serve (altered files, failed parity check)."""


class Held:
    """Something a replica holds for a multiplexed id: an adapter, or a prompt's pinned KV.
    Serve calls ``__del__`` when it evicts it; the memory is freed on the engine's thread."""

    def __init__(
        self,
        server: ModelServer,
        key: str,
        prompt: str,
        mode: str,
        adapter: str | None = None,
        pinned: int | None = None,
        prefix: int = 0,
        parity: str = "",
    ) -> None:
        self.server, self.key, self.prompt, self.mode = server, key, prompt, mode
        self.adapter, self.pinned, self.prefix, self.parity = adapter, pinned, prefix, parity

    def __del__(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.release(self)


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
class ModelServer:
    """One model replica (see the module docstring)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.cfg = config_from_dict(settings["config"])
        self.store = store_for(self.cfg.store)
        self.engine = serving_engine(self.cfg)
        self.checker = ParityChecker(self.cfg, self.engine)
        self.folders = Path(tempfile.mkdtemp(prefix="genpi-serve-adapters-"))
        self.held: dict[str, Held] = {}
        self.targets: dict[str, dict[str, Any]] = {}  # multiplexed id -> what it is (immutable)
        self.rejected: dict[str, str] = {}
        self.metrics = ReplicaMetrics()
        self.batcher = Batcher(self.engine, self.cfg.serve.batch_window_ms / 1000, self.engine.batch_size, self._tidy)

        async def load(key: str) -> Held:
            return await self._load(key)

        # The replica's LRU of what it holds, and what routing knows of it.
        self.hold = serve.multiplexed(max_num_models_per_replica=self.cfg.serve.max_adapters)(load)

    async def _load(self, key: str) -> Held:
        if key in self.rejected:
            raise Rejected(self.rejected[key])
        target = self.targets[key]
        if target["mode"] == "prompt":
            spec = PromptSpec.from_json(target["spec"])

            def pin() -> Held:
                ids = prefix_ids(self.engine.tokenizer, spec)
                return Held(self, key, spec.name, "prompt", pinned=self.engine.keep_prefix(ids), prefix=len(ids))

            held = await self.batcher.call(pin)
        else:
            held = await self._load_adapter(key, PublishedAdapter.from_json(target["adapter"]))
        self.held[key] = held
        self.metrics.loads.inc(tags={"prompt": held.prompt, "mode": held.mode})
        log.info("loaded %s (%s)%s", key, held.mode, f", parity {held.parity}" if held.parity else "")
        return held

    async def _load_adapter(self, key: str, entry: PublishedAdapter) -> Held:
        folder = self.folders / entry.prompt / entry.version
        try:
            if not folder.is_dir():
                part = Path(tempfile.mkdtemp(dir=self.folders))
                await asyncio.to_thread(registry.download, self.store, entry, part)
                folder.parent.mkdir(parents=True, exist_ok=True)
                part.rename(folder)
            outcome = await self.batcher.call(lambda: self.checker.check(entry, folder))
            name = await self.batcher.call(lambda: self.engine.add_adapter(folder))
        except Exception as e:  # any version that does not load is refused, saying why
            if not isinstance(e, (Rejected, registry.RegistryError)):
                e = Rejected(f"cannot load it: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            self.rejected[key] = str(e)
            self.metrics.rejections.inc(tags={"prompt": entry.prompt})
            shutil.rmtree(folder, ignore_errors=True)
            log.error("not serving %s: %s", key, e)
            raise Rejected(str(e)) from None
        return Held(self, key, entry.prompt, "adapter", adapter=name, parity=outcome)

    def release(self, held: Held) -> None:
        """Serve evicted ``held``: free its memory on the engine's thread (a request still queued
        for it reloads the adapter from its folder)."""
        if self.held.get(held.key) is held:
            del self.held[held.key]
        self.metrics.evictions.inc(tags={"prompt": held.prompt, "mode": held.mode})
        log.info("unloaded %s (%s)", held.key, held.mode)
        if held.pinned is not None:
            self.batcher.queue.put((lambda: self.engine.release_prefix(held.pinned), Future()))
        self.batcher.queue.put((self._tidy, Future()))

    def _tidy(self) -> None:
        """Unload every adapter nothing holds (on the engine's thread)."""
        wanted = {h.adapter for h in list(self.held.values())}
        for name in [a for a in self.engine.adapters if a not in wanted]:
            self.engine.remove_adapter(name)

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """One request's events: text deltas (streamed requests), then ``done`` with the counts;
        ``rejected`` when its version was refused, ``error`` when generation failed."""
        key = serve.get_multiplexed_model_id()
        self.targets.setdefault(key, request["target"])
        try:
            held = await self.hold(key)
        except Rejected as e:
            yield {"rejected": str(e)}
            return
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
        return {
            "held": sorted(self.held),
            "adapters": len(self.engine.adapters),
            "batches": self.batcher.batches,
            "rejected": dict(self.rejected),
        }

    def __del__(self) -> None:
        self.batcher.stop()
