"""What a model replica is, whichever engine it holds (:mod:`genpi.serve.deployment` for hf,
:mod:`genpi.serve.vllm_deployment` for vLLM): the same methods for the ingress, the same loading,
refusing and unloading of what it serves.

What a replica holds is keyed by the multiplexed model id (:attr:`Catalog.Target.key`), so Ray
Serve routes a request to a replica that already holds its adapter (without pinning it there:
a busy replica's requests go elsewhere and load it there too). At most ``serve.max_adapters``
are held; past that Serve unloads the least recently used, and the replica frees its memory.
Loading an adapter downloads it from the store, checks its files against the manifest's digests
and runs the parity check (:mod:`genpi.parity`); a version that fails is refused, with the reason,
and never served.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ray import serve

from genpi import registry
from genpi.config import config_from_dict
from genpi.errors import GenPIError
from genpi.prompt.spec import PromptSpec
from genpi.registry import PublishedAdapter
from genpi.serve.metrics import ReplicaMetrics
from genpi.store import store_for

log = logging.getLogger(__name__)

Event = dict[str, Any]


class Rejected(GenPIError):
    """A published version this replica will not serve (altered files, failed parity check)."""


class Held:
    """Something a replica holds for a multiplexed id: an adapter, or a prompt (its pinned KV on
    the hf engine). Serve calls ``__del__`` when it evicts it; the replica then frees the memory."""

    def __init__(
        self,
        server: Replica,
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


class Replica(ABC):
    """The model deployments' common part. A backend adds its engine and four methods: ``_hold_prompt``
    (prompt mode), ``_admit`` (check and load a downloaded adapter), ``_free`` (after an eviction)
    and ``_answer`` (one request's events)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.cfg = config_from_dict(settings["config"])
        self.store = store_for(self.cfg.store)
        self.folders = Path(tempfile.mkdtemp(prefix="genpi-serve-adapters-"))
        self.held: dict[str, Held] = {}
        self.targets: dict[str, dict[str, Any]] = {}  # multiplexed id -> what it is (immutable)
        self.rejected: dict[str, str] = {}
        self.metrics = ReplicaMetrics()

        async def load(key: str) -> Held:
            return await self._load(key)

        # The replica's LRU of what it holds, and what routing knows of it.
        self.hold = serve.multiplexed(max_num_models_per_replica=self.cfg.serve.max_adapters)(load)

    async def _load(self, key: str) -> Held:
        if key in self.rejected:
            raise Rejected(self.rejected[key])
        target = self.targets[key]
        if target["mode"] == "prompt":
            held = await self._hold_prompt(key, PromptSpec.from_json(target["spec"]))
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
            outcome, name = await self._admit(entry, folder)
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
        """Serve evicted ``held``: free its memory (a request still under way with it reloads the
        adapter from its folder)."""
        if self.held.get(held.key) is held:
            del self.held[held.key]
        self.metrics.evictions.inc(tags={"prompt": held.prompt, "mode": held.mode})
        log.info("unloaded %s (%s)", held.key, held.mode)
        self._free(held)

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[Event]:
        """One request's events: text deltas (streamed requests), then ``done`` with the counts;
        ``rejected`` when its version was refused, ``error`` when generation failed."""
        key = serve.get_multiplexed_model_id()
        self.targets.setdefault(key, request["target"])
        try:
            held = await self.hold(key)
        except Rejected as e:
            yield {"rejected": str(e)}
            return
        except Exception as e:  # the engine failed: an error the ingress can read (not the engine's own type)
            log.exception("loading %s failed", key)
            yield {"error": f"loading {key} failed: {type(e).__name__}: {e}"}
            return
        async for event in self._answer(held, request):
            yield event

    def _stats(self, adapters: int, batches: int) -> dict[str, Any]:
        """What this replica holds now (tests and benchmarks read it)."""
        return {"held": sorted(self.held), "adapters": adapters, "batches": batches, "rejected": dict(self.rejected)}

    @abstractmethod
    async def _hold_prompt(self, key: str, spec: PromptSpec) -> Held:
        """What serving ``spec`` in prompt mode needs held."""

    @abstractmethod
    async def _admit(self, entry: PublishedAdapter, folder: Path) -> tuple[str, str]:
        """Check the version in ``folder`` and load it: (the parity check's outcome, the adapter's
        engine name), or Rejected saying why."""

    @abstractmethod
    def _free(self, held: Held) -> None:
        """Free what ``held`` holds in the engine (callable from any thread)."""

    @abstractmethod
    def _answer(self, held: Held, request: dict[str, Any]) -> AsyncIterator[Event]:
        """The request's events (see :meth:`generate`)."""
