"""Transformers backend: left-padded batched generation (bf16 on CPU, any dtype on CUDA).

Requests may name a LoRA adapter (a PEFT folder): adapters are loaded once into the one copy of
the base weights, and a batch is served adapter by adapter (no adapter = the base model).
Sampling draws each request's tokens from its own generator, seeded from the call's seed and the
request (:func:`genpi.engines.base.request_seeds`, as the vLLM backend does), so a sampled reply
does not depend on the batch it shares.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import DynamicCache

from genpi.devices import DTYPES, cpu_threads, pick_device
from genpi.engines.base import (Conversation, Generation, SamplingParams, adapter_config, chat_token_ids,
                                leaves_no_room, request_seeds)
from genpi.engines.kv_cache import growing_cache
from genpi.models import resolve_model
from genpi.errors import ModelError

_GROUP_BY = 64
_MIN_SHARED_PREFIX = 32  # below this, a separate prefill pass costs more than it saves

def load_model_and_tokenizer(name: str, dtype: str = "bfloat16", device: str = "auto") -> tuple[Any, Any]:
    """Load a registry/local/S3 model for inference or training; the tokenizer pads on the left."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model(name)
    target = pick_device(device)
    # An actor given several GPUs (a 70B generator) spreads the layers over all of them.
    spread = target == "cuda" and torch.cuda.device_count() > 1
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype],
                                                     device_map="auto" if spread else None)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model {name!r} from {folder}: {e}") from None
    if tokenizer.chat_template is None:
        raise ModelError(f"model {name!r} has no chat template; GenPI needs an instruct (chat) model")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return (model if spread else model.to(target)).eval(), tokenizer


class SeededSampler(LogitsProcessor):
    """Temperature and top-p sampling with one generator per row, seeded per request: a row's
    draws do not depend on the rows beside it. Returns scores where only the drawn token is
    finite, so greedy decoding takes it."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float) -> None:
        self.seeds, self.temperature, self.top_p = seeds, temperature, top_p
        self.generators: list[torch.Generator] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.generators:
            self.generators = [torch.Generator(scores.device).manual_seed(s) for s in self.seeds]
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        ranked, order = probs.sort(dim=-1, descending=True)
        ranked[(ranked.cumsum(dim=-1) - ranked) > self.top_p] = 0  # keep the smallest set reaching top_p
        picks = torch.stack([order[row, torch.multinomial(ranked[row], 1, generator=generator)]
                             for row, generator in enumerate(self.generators)])
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, picks, 0.0)


class HFEngine:
    """Generates replies to chat conversations with ``transformers``."""

    def __init__(self, name: str, dtype: str = "bfloat16", device: str = "auto", batch_size: int = 16,
                 max_context: int = 0, threads: int = 0, prefix_sharing: bool = True) -> None:
        if threads or pick_device(device) == "cpu":
            torch.set_num_threads(cpu_threads(threads))  # the actor's CPU reservation, unless configured
        self.model_name = name
        self.model, self.tokenizer = load_model_and_tokenizer(name, dtype, device)
        own = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.max_context = min(max_context, own) if max_context else own
        self.batch_size = batch_size
        self.prefix_sharing = prefix_sharing
        self.growing_kv = True  # False: transformers' DynamicCache (a baseline for bench/synthesis.py)
        self.adapters: dict[str, str] = {}  # adapter name -> folder it was loaded from

    def add_adapter(self, folder: str | Path) -> str:
        """Load the PEFT adapter in ``folder`` (once); returns the name requests use for it: the folder."""
        name = str(folder)
        if name in self.adapters:
            return name
        from peft import PeftModel

        adapter_config(folder)  # a clear error for a folder that is not an adapter
        key = f"a{len(self.adapters)}"  # PEFT adapter names may not contain dots or slashes
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(str(folder), adapter_name=key)
        else:
            self.model = PeftModel.from_pretrained(self.model, str(folder), adapter_name=key).eval()
        self.adapters[name] = key
        return name

    @contextlib.contextmanager
    def adapter_scope(self, adapter: str | None) -> Iterator[Any]:
        """The model with ``adapter`` active, or the plain base model when ``adapter`` is None."""
        if adapter is not None and adapter not in self.adapters:
            raise ModelError(f"adapter {adapter} was not loaded; call add_adapter first")
        if not self.adapters:
            yield self.model
        elif adapter is None:
            with self.model.disable_adapter():
                yield self.model
        else:
            self.model.set_adapter(self.adapters[adapter])
            yield self.model

    def encode(self, conversation: Conversation) -> list[int]:
        """Token ids of a conversation followed by the assistant's generation header."""
        return chat_token_ids(self.tokenizer, conversation)

    def count_tokens(self, conversations: list[Conversation]) -> list[int]:
        return [len(self.encode(c)) for c in conversations]

    @torch.inference_mode()
    def generate(self, conversations: list[Conversation], params: SamplingParams,
                 adapters: list[str | None] | None = None) -> list[Generation]:
        """One generation per conversation; ``adapters[i]`` names the LoRA adapter for request i (None: base)."""
        if adapters is None or not any(adapters):
            with self.adapter_scope(None):
                return self._generate_all(conversations, params)
        if len(adapters) != len(conversations):
            raise ValueError("generate: one adapter entry per conversation")
        results: list[Generation | None] = [None] * len(conversations)
        for adapter in dict.fromkeys(adapters):
            picked = [i for i, a in enumerate(adapters) if a == adapter]
            with self.adapter_scope(adapter):
                for i, gen in zip(picked, self._generate_all([conversations[i] for i in picked], params)):
                    results[i] = gen
        return [r for r in results if r is not None]

    def _generate_all(self, conversations: list[Conversation], params: SamplingParams) -> list[Generation]:
        encoded = [self.encode(c) for c in conversations]
        results: list[Generation | None] = [None] * len(encoded)
        fits = []
        for i, ids in enumerate(encoded):
            if leaves_no_room(len(ids), self.max_context):
                results[i] = Generation("", "context", len(ids), 0)
            else:
                fits.append(i)
        # Conversations with the same opening (the prompt) together, then by length: shared
        # prefixes get long and padding stays small.
        fits.sort(key=lambda i: (encoded[i][:_GROUP_BY], len(encoded[i])))
        seeds = request_seeds(params.seed, encoded)
        for chunk in self._chunks([encoded[i] for i in fits], fits):
            batch = [encoded[i] for i in chunk]
            for i, gen in zip(chunk, self._generate_batch(batch, params, [seeds[i] for i in chunk])):
                results[i] = gen
        return [r for r in results if r is not None]

    def _chunks(self, ordered: list[list[int]], indexes: list[int]) -> list[list[int]]:
        """Batches of at most ``batch_size`` in the sorted order, never mixing short conversations
        with ones much longer, whichever comes first: a batch of 28 teachers and 4 students (no
        prompt) pads every student to the prompt's length and shares no prefix (measured: the
        outputs step 3x slower)."""
        chunks: list[list[int]] = []
        first = 0
        for k, ids in enumerate(ordered):
            n, opened = len(ids), len(ordered[first])
            if not chunks or len(chunks[-1]) == self.batch_size or n > 2 * opened + _GROUP_BY \
                    or opened > 2 * n + _GROUP_BY:
                chunks.append([])
                first = k
            chunks[-1].append(indexes[k])
        return chunks

    def _shared_prefix(self, batch: list[list[int]]) -> tuple[int, Any]:
        """Length of the token prefix every conversation in ``batch`` starts with, and a cache holding it.

        Conversations that carry the same long prompt (teacher, agent) then pay for its prefill
        once per batch instead of once per conversation. At least one token of each conversation
        stays uncached so that generation has logits to start from.
        """
        cache = growing_cache(self.model) if self.growing_kv else DynamicCache(config=self.model.config)
        if not self.prefix_sharing or len(batch) < 2:
            return 0, cache
        shortest = min(len(ids) for ids in batch)
        length = next((k for k in range(shortest) if any(ids[k] != batch[0][k] for ids in batch)), shortest)
        length = min(length, shortest - 1)
        if length < _MIN_SHARED_PREFIX:
            return 0, cache
        prefix = torch.tensor([batch[0][:length]], device=self.model.device)
        self.model(input_ids=prefix, past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(len(batch))
        return length, cache

    def _generate_batch(self, batch: list[list[int]], params: SamplingParams, seeds: list[int]) -> list[Generation]:
        shared, cache = self._shared_prefix(batch)
        pad = self.tokenizer.pad_token_id
        # Padding goes between the shared prefix and each suffix; positions come from the mask.
        tails = [ids[shared:] for ids in batch]
        tail_width = max(len(t) for t in tails)
        width = shared + tail_width
        rows = [batch[0][:shared] + [pad] * (tail_width - len(t)) + t for t in tails]
        masks = [[1] * shared + [0] * (tail_width - len(t)) + [1] * len(t) for t in tails]
        input_ids = torch.tensor(rows, device=self.model.device)
        attention = torch.tensor(masks, device=self.model.device)
        budget = max(1, min(params.max_new_tokens, self.max_context - width))
        sampling: dict[str, Any] = {"do_sample": False}
        if params.temperature > 0:  # sampled by the processor, row by row; greedy then takes its pick
            sampling["logits_processor"] = LogitsProcessorList([SeededSampler(seeds, params.temperature,
                                                                               params.top_p)])
        extra: dict[str, Any] = {"stop_strings": list(params.stop), "tokenizer": self.tokenizer} if params.stop else {}
        out = self.model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=budget,
                                  pad_token_id=pad, top_k=None, past_key_values=cache, **sampling, **extra)
        eos = set(self._eos_ids())
        gens = []
        for ids, row in zip(batch, out[:, width:].tolist()):
            length = next((k for k, t in enumerate(row) if t in eos), None)
            ended = length is not None
            tokens = row[:length] if ended else row
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            hit = min((s for s in params.stop if s in text), key=text.index, default="")
            if hit:
                text, ended = text[:text.index(hit)], True
            gens.append(Generation(text.strip(), "stop" if ended else "length", len(ids), len(tokens), hit))
        return gens

    def _eos_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        ids = eos if isinstance(eos, list) else [eos]
        return [i for i in ids + [self.tokenizer.eos_token_id] if i is not None]
