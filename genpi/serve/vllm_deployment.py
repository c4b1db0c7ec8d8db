"""The vLLM model deployment (``serve.backend vllm``): a replica holds one vLLM async engine
(:mod:`genpi.engines.vllm_async`) and answers like the hf one (:mod:`genpi.serve.replica`).

- Every request goes into vLLM as it arrives (continuous batching; no batching window), with its
  adapter as a ``LoRARequest``; its tokens are streamed as vLLM decodes them.
- Adapters: ``serve.max_adapters`` are held per replica and may run in one step (vLLM's
  ``max_loras`` and ``max_cpu_loras``), up to rank ``models.target.max_lora_rank`` (16 when 0);
  an adapter of higher rank is refused, saying so. Eviction removes it from vLLM (``remove_lora``).
- Prompt mode is the prompt prepended: vLLM's automatic prefix caching keeps its KV (computed when
  the prompt is first held), and ``cached_tokens`` reports what each request read from the cache.
- The parity check runs on this engine itself, with the adapter as requests get it: an adapter
  that vLLM loads and that changes nothing shows here and nowhere else. vLLM's kernels (and bf16)
  are not the trainer's float32 ones, so an answer that differs from the recorded one must differ
  only at near ties (:func:`genpi.parity.near_ties`); it must still differ from the base model's
  on at least one probe.

The replica runs on the interpreter with vLLM (``.venv-vllm`` on CPU; Ray ``runtime_env``
``py_executable``, :func:`genpi.engines.environments.serve_backend`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ray import serve

from genpi import parity
from genpi.chat import Conversation
from genpi.config import GenPIConfig
from genpi.engines.base import Generation, SamplingParams
from genpi.engines.vllm import engine_options
from genpi.engines.vllm_async import AsyncVLLMEngine
from genpi.prompt.spec import PromptSpec
from genpi.registry import PublishedAdapter
from genpi.serve.batcher import TextStream
from genpi.serve.catalog import NO_PROBES
from genpi.serve.fallback import prefix_ids
from genpi.serve.replica import Event, Held, Rejected, Replica

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM 0.32 can be started with


class Blocking:
    """The async engine as the parity module calls an engine: one blocking call at a time, from a
    thread other than the event loop's."""

    def __init__(self, engine: AsyncVLLMEngine, loop: asyncio.AbstractEventLoop) -> None:
        self.engine, self.loop = engine, loop

    def _run(self, ids: list[int], params: SamplingParams, adapter: str | None, logprobs: int = 0) -> Any:
        async def last() -> Any:
            async for step in self.engine.stream(ids, params, adapter, logprobs=logprobs, steps=False):
                if step.done is not None:
                    return step
            raise RuntimeError("vLLM ended a request without a result")

        return asyncio.run_coroutine_threadsafe(last(), self.loop).result()

    def generate(
        self, conversations: list[Conversation], params: SamplingParams, adapters: list[str | None]
    ) -> list[Generation]:
        return [self._run(self.engine.encode(c), params, a).done for c, a in zip(conversations, adapters)]

    def near_ties(self, adapter: str, probe: dict[str, Any]) -> str | None:
        """:func:`genpi.parity.near_ties` for one probe on this engine."""
        ids, tokenizer = self.engine.encode(probe["messages"]), self.engine.tokenizer

        def greedy(forced: list[int], n: int) -> tuple[list[int], list[dict[int, float]]]:
            step = self._run(ids + forced, SamplingParams(max_new_tokens=n), adapter, logprobs=parity.TOP_LOGPROBS)
            return step.tokens, step.logprobs

        return parity.near_ties(probe["reply"], greedy, tokenizer.decode)


def serving_engine(cfg: GenPIConfig) -> AsyncVLLMEngine:
    """The replicas' vLLM engine, from ``models.target`` and ``serve``; call it on a running event loop."""
    target, s = cfg.models.target, cfg.serve
    options = engine_options(
        target.name,
        target.dtype,
        target.device,
        target.batch_size,
        target.max_context,
        target.threads or max(1, int(s.num_cpus)),
        target.kv_cache_gb,
        target.gpu_memory_utilization,
    )
    wanted = target.max_lora_rank or 16
    rank = next((r for r in LORA_RANKS if r >= wanted), LORA_RANKS[-1])
    return AsyncVLLMEngine(options, max_lora_rank=rank, max_loras=s.max_adapters)


async def parity_check(
    engine: AsyncVLLMEngine, name: str, entry: PublishedAdapter, base_replies: dict[str, str]
) -> str:
    """The parity check of ``entry`` (added to ``engine`` as ``name``) on vLLM: "passed", or
    :class:`Rejected` saying why (see the module docstring)."""
    if not entry.probes:
        return NO_PROBES
    blocking = Blocking(engine, asyncio.get_running_loop())
    why = await asyncio.to_thread(
        parity.verdict, blocking, name, entry.probes, base_replies, lambda probe: blocking.near_ties(name, probe)
    )
    if why:
        raise Rejected(why)
    return "passed"


@serve.deployment
class VLLMModelServer(Replica):
    """One vLLM model replica (see the module docstring)."""

    async def __init__(self, settings: dict[str, Any]) -> None:
        super().__init__(settings)
        self.engine = serving_engine(self.cfg)
        self.loop = asyncio.get_running_loop()
        self.base_replies: dict[str, str] = {}  # probe -> the base model's answer on this engine
        self.running = self.requests = 0

    async def _hold_prompt(self, key: str, spec: PromptSpec) -> Held:
        """Prefill the prompt once, so vLLM's prefix cache holds its KV for the requests to come."""
        ids = prefix_ids(self.engine.tokenizer, spec)
        async for _ in self.engine.stream(ids, SamplingParams(max_new_tokens=1), steps=False):
            pass
        return Held(self, key, spec.name, "prompt")

    async def _admit(self, entry: PublishedAdapter, folder: Path) -> tuple[str, str]:
        name = await self.engine.add_adapter(folder)
        try:
            return await parity_check(self.engine, name, entry, self.base_replies), name
        except BaseException:
            await self.engine.remove_adapter(name)
            raise

    def _free(self, held: Held) -> None:
        if held.adapter is not None:
            asyncio.run_coroutine_threadsafe(self.engine.remove_adapter(held.adapter), self.loop)

    async def _answer(self, held: Held, request: dict[str, Any]) -> AsyncIterator[Event]:
        stops = tuple(request["params"]["stop"])
        params = SamplingParams(**{**request["params"], "stop": stops})
        text = TextStream(self.engine.tokenizer, stops) if request["stream"] else None
        ids = self.engine.encode(request["messages"])
        self.running += 1
        self.requests += 1
        try:
            async for step in self.engine.stream(ids, params, held.adapter, steps=text is not None):
                if text is not None and (delta := "".join(text.push(t) for t in step.tokens)):
                    yield {"delta": delta}
                if (done := step.done) is None:
                    continue
                if text is not None and (delta := text.finish(done.text)):
                    yield {"delta": delta}
                yield {
                    "done": {
                        "text": done.text,
                        "finish_reason": done.finish_reason,
                        "batch": self.running,
                        "prompt_tokens": done.prompt_tokens,
                        "completion_tokens": done.output_tokens,
                        "parity": held.parity,
                        "cached_tokens": step.cached_tokens,
                    }
                }
        except Exception as e:  # vLLM's error for this request: the client gets it, the replica serves on
            yield {"error": f"generation failed: {type(e).__name__}: {e}"}
        finally:
            self.running -= 1

    async def stats(self) -> dict[str, Any]:
        """What this replica holds now; ``adapters`` counts what vLLM itself has loaded, ``batches``
        the requests it answered (each joins vLLM's running batch on its own)."""
        return self._stats(len(await self.engine.llm.list_loras()), self.requests)

    async def check_health(self) -> None:
        """Serve's health check: a replica whose vLLM engine died is replaced."""
        await self.engine.llm.check_health()

    def __del__(self) -> None:
        if (engine := getattr(self, "engine", None)) is not None:
            engine.shutdown()
