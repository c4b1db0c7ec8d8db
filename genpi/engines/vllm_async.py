"""vLLM's async engine for a server: each request is added as it arrives (continuous batching),
its tokens come back as they are decoded, and LoRA adapters are added and removed while it runs.

It takes the job engine's options (:func:`genpi.engines.vllm.engine_options`: prefix caching,
whole prompts prefilled on CPU), token ids (the model's chat template) and per-request seeds
(:func:`genpi.engines.base.request_seeds`), so a reply equals the job's vLLM engine's. Held
adapters are vLLM's CPU LoRA cache (``max_cpu_loras``); ``max_loras`` of them run in one step.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genpi.chat import Conversation, request_ids
from genpi.engines.base import Generation, SamplingParams, leaves_no_room, request_seeds
from genpi.engines.vllm import eos_ids, finished, lora_request, vllm_import, vllm_params
from genpi.errors import ModelError


@dataclass
class Step:
    """What one engine step gave a request: its new tokens (with the top ``logprobs`` of each, when
    asked), and on the last step the finished Generation and the prompt tokens read from the cache."""

    tokens: list[int]
    logprobs: list[dict[int, float]] = field(default_factory=list)
    done: Generation | None = None
    cached_tokens: int = 0


class AsyncVLLMEngine:
    """One vLLM ``AsyncLLM``: streamed requests, adapters per request."""

    def __init__(self, options: dict[str, Any], max_lora_rank: int = 16, max_loras: int = 4) -> None:
        """``options``: vLLM's engine arguments (:func:`genpi.engines.vllm.engine_options`); adapters
        up to rank ``max_lora_rank``, ``max_loras`` of them held and run in one step."""
        name = options["model"]
        options = {**options, "enable_lora": True, "max_lora_rank": max_lora_rank}
        options.update(max_loras=max_loras, max_cpu_loras=max_loras)
        vllm = vllm_import()
        self.max_context, self.max_lora_rank = options["max_model_len"], max_lora_rank
        try:
            self.llm = vllm.AsyncLLMEngine.from_engine_args(vllm.AsyncEngineArgs(**options, disable_log_stats=True))
        except Exception as e:  # vLLM raises many types for a model it cannot run
            raise ModelError(f"vLLM cannot load the model in {name}: {e}") from None
        self.tokenizer = self.llm.get_tokenizer()
        self.eos = eos_ids(self.llm.model_config.hf_config, self.tokenizer)
        self.adapters: dict[str, Any] = {}  # name (its folder) -> LoRARequest
        self._numbers = itertools.count(1)  # vLLM adapter ids: never reused, so no cache mistakes one for another
        self._requests = itertools.count()

    async def add_adapter(self, folder: str | Path) -> str:
        """Load the PEFT adapter in ``folder`` into vLLM; returns the name requests use: the folder."""
        name = str(folder)
        if name not in self.adapters:
            request = lora_request(folder, next(self._numbers), self.max_lora_rank)
            if not await self.llm.add_lora(request):
                raise ModelError(f"vLLM did not load the adapter in {folder}")
            self.adapters[name] = request
        return name

    async def remove_adapter(self, name: str) -> None:
        """Unload an adapter: vLLM frees its weights."""
        request = self.adapters.pop(name, None)
        if request is not None:
            await self.llm.remove_lora(request.lora_int_id)

    def encode(self, conversation: Conversation) -> list[int]:
        return request_ids(self.tokenizer, conversation)

    async def stream(
        self,
        ids: list[int],
        params: SamplingParams,
        adapter: str | None = None,
        logprobs: int = 0,
        steps: bool = True,
    ) -> AsyncIterator[Step]:
        """Generate a reply to the token ids ``ids``: one Step per engine step that decoded tokens
        (``steps`` False: only the last), the last carrying the Generation."""
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        if leaves_no_room(len(ids), self.max_context):
            yield Step([], done=Generation("", "context", len(ids), 0))
            return
        lora = self.adapters.get(adapter) if adapter else None
        if adapter and lora is None:
            raise ModelError(f"adapter {adapter} was not loaded; call add_adapter first")
        sampling = vllm_params(
            params,
            ids,
            self.max_context,
            request_seeds(params.seed, [ids])[0],
            logprobs=logprobs or None,
            output_kind=RequestOutputKind.CUMULATIVE if steps else RequestOutputKind.FINAL_ONLY,
        )
        seen = 0
        async for out in self.llm.generate(
            TokensPrompt(prompt_token_ids=ids), sampling, f"genpi-{next(self._requests)}", lora_request=lora
        ):
            completion = out.outputs[0]
            tokens = list(completion.token_ids)
            step = Step(tokens[seen:])
            if logprobs:
                step.logprobs = [{t: lp.logprob for t, lp in d.items()} for d in (completion.logprobs or [])[seen:]]
            seen = len(tokens)
            if out.finished:
                step.done = finished(completion, len(ids), self.eos)
                step.cached_tokens = out.num_cached_tokens or 0
            if step.tokens or step.done:
                yield step

    def shutdown(self) -> None:
        self.llm.shutdown()
