"""Transformers backend: left-padded batched generation (bf16 on CPU, any dtype on CUDA).

Requests may name a LoRA adapter (a PEFT folder): adapters are loaded once beside the one copy of
the base weights (and removed to free their memory) by :mod:`genpi.engines.lora_bank`. A batch
whose requests name one adapter runs with it active (or merged, when the engine keeps merged
copies: a server's hot adapters); a batch that mixes adapters (the base model among them) runs as
one forward with each row's factors.
Sampling draws each request's tokens from its own generator, seeded from the call's seed and the
request (:func:`genpi.engines.base.request_seeds`, as the vLLM backend does), so a sampled reply
does not depend on the batch it shares.

A conversation that comes back with new turns prefills only its new tokens: each conversation's
KV cache is kept between calls (:mod:`genpi.engines.turn_cache`, tagged by adapter), and within
a batch the prompt's KV is computed once for every conversation that opens with it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import DynamicCache
from transformers.generation.streamers import BaseStreamer

from genpi.chat import MIN_SHARED_PREFIX, context_length, request_ids, shared_opening
from genpi.config import ModelConfig
from genpi.devices import DTYPES, cpu_threads, pick_device
from genpi.engines.base import Conversation, Generation, SamplingParams, adapter_config, leaves_no_room, request_seeds
from genpi.engines.kv_cache import GrowingLayer, growing_cache
from genpi.engines.lora_bank import LoraBank
from genpi.engines.shared_prefix import SharedPrefixLayer, use_shared_prefix_attention
from genpi.engines.turn_cache import TurnCache
from genpi.errors import ModelError
from genpi.models import resolve_model

_GROUP_BY = 64

TokenCallback = Callable[[int, int], None]  # (request index, token id), as each token is decoded


def load_model_and_tokenizer(name: str, dtype: str = "bfloat16", device: str = "auto") -> tuple[Any, Any]:
    """Load a registry/local/S3 model for inference or training; the tokenizer pads on the left."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model(name)
    target = pick_device(device)
    # An actor given several GPUs (a 70B generator) spreads the layers over all of them.
    spread = target == "cuda" and torch.cuda.device_count() > 1
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype], device_map="auto" if spread else None)
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
        picks = torch.stack(
            [
                order[row, torch.multinomial(ranked[row], 1, generator=generator)]
                for row, generator in enumerate(self.generators)
            ]
        )
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, picks, 0.0)


class RowStreamer(BaseStreamer):
    """Hands each decoded token of a batch to ``on_token`` with its request's index, up to the
    row's end (end of turn or padding)."""

    def __init__(self, on_token: TokenCallback, indexes: list[int], ends: set[int]) -> None:
        self.on_token, self.indexes, self.ends = on_token, indexes, ends
        self.done = [False] * len(indexes)
        self.started = False

    def put(self, value: torch.Tensor) -> None:
        if not self.started:  # the first call carries the input ids
            self.started = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.done[row] or token in self.ends:
                self.done[row] = True
                continue
            self.on_token(self.indexes[row], token)

    def end(self) -> None:
        pass


class HFEngine:
    """Generates replies to chat conversations with ``transformers``."""

    def __init__(
        self,
        name: str,
        dtype: str = "bfloat16",
        device: str = "auto",
        batch_size: int = 16,
        max_context: int = 0,
        threads: int = 0,
        prefix_sharing: bool = True,
        turn_cache_mib: int = 2048,
        max_merged: int = 0,
    ) -> None:
        if threads or pick_device(device) == "cpu":
            torch.set_num_threads(cpu_threads(threads))  # the actor's CPU reservation, unless configured
        self.model_name = name
        self.model, self.tokenizer = load_model_and_tokenizer(name, dtype, device)
        own = context_length(self.model.config)
        self.max_context = min(max_context, own) if max_context else own
        self.batch_size = batch_size
        self.prefix_sharing = prefix_sharing
        self.growing_kv = True  # False: transformers' DynamicCache (a baseline for bench/synthesis.py)
        # Each conversation's KV between calls (0 MiB: every call prefills each conversation whole);
        # sliding-window and other special cache layers keep their own rule, so not for them.
        self.turn_cache = TurnCache(turn_cache_mib * 2**20)
        self._layers_keepable = all(isinstance(layer, GrowingLayer) for layer in growing_cache(self.model).layers)
        # A shared opening's KV held once per batch and read once per decode step (not once per row).
        self._opening_once = self._layers_keepable and prefix_sharing and use_shared_prefix_attention(self.model)
        self.prefilled_tokens = 0  # tokens run through the model before generation, for benchmarks
        # Adapters by name (their folder); ``max_merged`` of them kept merged for single-adapter batches.
        self.bank = LoraBank(self.model, max_merged)
        self._tags: list[str | None] = []  # each row's adapter in the batch being generated

    @property
    def adapters(self) -> list[str]:
        """The names of the loaded adapters."""
        return self.bank.names

    def add_adapter(self, folder: str | Path) -> str:
        """Load the PEFT LoRA adapter in ``folder`` (once); returns the name requests use for it: the folder."""
        name = str(folder)
        if name in self.bank.configs:
            return name
        adapter_config(folder)  # a clear error for a folder that is not an adapter
        self.bank.add(name, Path(folder))
        return name

    def remove_adapter(self, name: str) -> None:
        """Unload an adapter added with :meth:`add_adapter`: its weights and its conversations' KV go."""
        if name not in self.bank.configs:
            return
        self.turn_cache.drop_tag(name)
        self.bank.remove(name)

    def adapter_shape(self, name: str) -> dict[str, Any]:
        """LoRA rank and adapted layer count of a loaded adapter (None: every layer)."""
        config = self.bank.configs[name]
        layers = config.get("layers_to_transform")
        count = 1 if isinstance(layers, int) else len(layers) if layers else None
        return {"lora_rank": int(config["r"]), "lora_layers": count}

    def keep_prefix(self, ids: list[int]) -> int:
        """Compute the base model's KV of ``ids`` (a served prompt) once and keep it until
        :meth:`release_prefix`: every request that opens with ``ids`` prefills only what follows."""
        with torch.inference_mode(), self.adapter_scope(None) as model:
            cache = growing_cache(model)
            model(input_ids=torch.tensor([ids], device=model.device), cache=cache, use_cache=True)
        kv = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
        return self.turn_cache.pin(ids, kv)

    def release_prefix(self, key: int) -> None:
        self.turn_cache.unpin(key)

    @contextlib.contextmanager
    def adapter_scope(self, adapter: str | None) -> Iterator[Any]:
        """The model with ``adapter`` active, or the plain base model when ``adapter`` is None."""
        if adapter is not None and adapter not in self.bank.configs:
            raise ModelError(f"adapter {adapter} was not loaded; call add_adapter first")
        with self.bank.use(adapter, merge=True):
            yield self.model

    def encode(self, conversation: Conversation) -> list[int]:
        """Token ids of a conversation followed by the assistant's generation header."""
        return request_ids(self.tokenizer, conversation)

    def count_tokens(self, conversations: list[Conversation]) -> list[int]:
        return [len(self.encode(c)) for c in conversations]

    @torch.inference_mode()
    def generate(
        self,
        conversations: list[Conversation],
        params: SamplingParams,
        adapters: list[str | None] | None = None,
        on_token: TokenCallback | None = None,
    ) -> list[Generation]:
        """One generation per conversation; ``adapters[i]`` names the LoRA adapter for request i (None: base).
        ``on_token(i, token_id)`` sees each token of request i as it is decoded."""
        tags = list(adapters) if adapters is not None else [None] * len(conversations)
        if len(tags) != len(conversations):
            raise ValueError("generate: one adapter entry per conversation")
        missing = sorted({a for a in tags if a is not None and a not in self.bank.configs})
        if missing:
            raise ModelError(f"adapter {missing[0]} was not loaded; call add_adapter first")
        return self._generate_all(conversations, params, tags, on_token)

    def _generate_all(
        self,
        conversations: list[Conversation],
        params: SamplingParams,
        tags: list[str | None],
        on_token: TokenCallback | None,
    ) -> list[Generation]:
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
            self._tags = [tags[i] for i in chunk]
            streamer = (
                RowStreamer(on_token, chunk, set(self._eos_ids()) | {self.tokenizer.pad_token_id}) if on_token else None
            )
            # One adapter: it is the active one (merged, where the bank keeps merged copies). Several: per row.
            uniform = len(set(self._tags)) == 1
            with self.adapter_scope(self._tags[0]) if uniform else self.bank.use_rows(self._tags):
                gens = self._generate_batch(batch, params, [seeds[i] for i in chunk], streamer)
            for i, gen in zip(chunk, gens):
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
            if (
                not chunks
                or len(chunks[-1]) == self.batch_size
                or n > 2 * opened + _GROUP_BY
                or opened > 2 * n + _GROUP_BY
            ):
                chunks.append([])
                first = k
            chunks[-1].append(indexes[k])
        return chunks

    def _turn_cache(self) -> TurnCache | None:
        keeps = self.turn_cache.max_bytes and self.growing_kv and self._layers_keepable
        return self.turn_cache if keeps else None

    def _shared_prefix(self, batch: list[list[int]]) -> tuple[int, Any]:
        """Length of the token prefix every conversation in ``batch`` starts with, and a cache holding it.

        Conversations that carry the same long prompt (teacher, agent) then pay for its prefill
        once per batch instead of once per conversation. At least one token of each conversation
        stays uncached so that generation has logits to start from.
        """
        cache = growing_cache(self.model) if self.growing_kv else DynamicCache(config=self.model.config)
        length = shared_opening(batch) if self.prefix_sharing and len(set(self._tags)) <= 1 else 0  # one per adapter
        if not length:
            return 0, cache
        prefix = torch.tensor([batch[0][:length]], device=self.model.device)
        self.model(input_ids=prefix, cache=cache, use_cache=True)
        self.prefilled_tokens += length
        if self._opening_once and self.growing_kv:  # not in the DynamicCache baseline
            cache.layers = [SharedPrefixLayer(layer.keys, layer.values) for layer in cache.layers]
        else:
            cache.batch_repeat_interleave(len(batch))
        return length, cache

    def _kept_turns(
        self, batch: list[list[int]], turns: TurnCache
    ) -> tuple[list[int], list[int | None], int, Any] | None:
        """Each conversation's cached length and entry from earlier calls, the length of the
        opening they all share, and a cache holding them: that opening once (where the model reads
        it once, :mod:`genpi.engines.shared_prefix`), then row ``r``'s other cached keys
        right-aligned in the next ``max(lengths) - opening`` positions. None when too little is
        cached to be worth it."""
        matches = [turns.match(ids, tag) for ids, tag in zip(batch, self._tags)]
        lengths = [min(length, len(ids) - 1) for (_, length), ids in zip(matches, batch)]
        if max(lengths) < MIN_SHARED_PREFIX:
            return None
        keys = [key if length else None for (key, _), length in zip(matches, lengths)]
        opening = 0
        if self._opening_once and len(set(self._tags)) == 1 and all(k is not None for k in keys):  # one adapter's KV
            # each row's cached tokens and the one after them: the opening stays within every row's cache
            opening = shared_opening([ids[: length + 1] for ids, length in zip(batch, lengths)])
        width = max(lengths) - opening
        cache = growing_cache(self.model)
        first = turns.kv(next(k for k in keys if k is not None))
        if opening:
            cache.layers = [SharedPrefixLayer(k0[:, :, :opening], v0[:, :, :opening]) for k0, v0 in first]
        for layer, (k0, v0) in enumerate(first):
            k = k0.new_zeros((len(batch), k0.shape[1], width, k0.shape[3]))
            v = v0.new_zeros((len(batch), v0.shape[1], width, v0.shape[3]))
            for row, (key, length) in enumerate(zip(keys, lengths)):
                if key is not None and length > opening:
                    kr, vr = turns.kv(key)[layer]
                    k[row, :, width - (length - opening) :] = kr[0, :, opening:length]
                    v[row, :, width - (length - opening) :] = vr[0, :, opening:length]
            cache.update(k, v, layer)
        return lengths, keys, opening, cache

    def _generate_batch(
        self, batch: list[list[int]], params: SamplingParams, seeds: list[int], streamer: RowStreamer | None = None
    ) -> list[Generation]:
        turns = self._turn_cache()
        kept = self._kept_turns(batch, turns) if turns is not None and turns.entries else None
        if kept is not None:
            cached, keys, opening, cache = kept
        else:
            shared, cache = self._shared_prefix(batch)
            cached, keys, opening = [shared] * len(batch), [None] * len(batch), shared
        pad = self.tokenizer.pad_token_id
        # Row r: [the opening all rows share] [pad | its other cached tokens] [pad | its new tokens].
        # Padding sits inside each part; positions come from the mask, so a cached token keeps
        # the position it was computed at.
        head, tail_width = max(cached), max(len(ids) - c for ids, c in zip(batch, cached))
        width = head + tail_width
        rows, masks = [], []
        for ids, c in zip(batch, cached):
            gap, room = head - c, tail_width - (len(ids) - c)
            rows.append(ids[:opening] + [pad] * gap + ids[opening:c] + [pad] * room + ids[c:])
            masks.append([1] * opening + [0] * gap + [1] * (c - opening) + [0] * room + [1] * (len(ids) - c))
        self.prefilled_tokens += sum(len(ids) - c for ids, c in zip(batch, cached))
        input_ids = torch.tensor(rows, device=self.model.device)
        attention = torch.tensor(masks, device=self.model.device)
        budget = max(1, min(params.max_new_tokens, self.max_context - width))
        sampling: dict[str, Any] = {"do_sample": False}
        if not params.greedy:  # sampled by the processor, row by row; greedy then takes its pick
            sampling["logits_processor"] = LogitsProcessorList([SeededSampler(seeds, params.temperature, params.top_p)])
        extra: dict[str, Any] = {"stop_strings": list(params.stop), "tokenizer": self.tokenizer} if params.stop else {}
        if streamer is not None:
            extra["streamer"] = streamer
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=budget,
            pad_token_id=pad,
            top_k=None,
            cache=cache,
            **sampling,
            **extra,
        )
        eos = set(self._eos_ids())
        gens = []
        for r, (ids, row) in enumerate(zip(batch, out[:, width:].tolist())):
            length = next((k for k, t in enumerate(row) if t in eos), None)
            ended = length is not None
            tokens = row[:length] if ended else row
            if turns is not None:
                self._keep_turn(turns, cache, r, ids, masks[r], row[: len(tokens) + 1], keys[r], self._tags[r])
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            hit = min((s for s in params.stop if s in text), key=text.index, default="")
            if hit:
                text, ended = text[: text.index(hit)], True
            gens.append(Generation(text.strip(), "stop" if ended else "length", len(ids), len(tokens), hit))
        return gens

    def _keep_turn(
        self,
        turns: TurnCache,
        cache: Any,
        row: int,
        ids: list[int],
        mask: list[int],
        generated: list[int],
        continued: int | None,
        tag: str | None,
    ) -> None:
        """Keep row ``row``'s KV (its real tokens, up to the last generated one, whose KV was never
        computed) for the conversation's next call."""
        width = len(mask)
        computed = cache.get_seq_length() - width  # generated positions whose KV exists
        kept = generated[: max(0, min(len(generated) - 1, computed))]
        positions = [p for p, m in enumerate(mask) if m] + list(range(width, width + len(kept)))
        index = torch.tensor(positions, device=self.model.device)
        kv = [layer.row_kv(row, index) for layer in cache.layers]
        turns.put(ids, kept, kv, continued, tag)

    def _eos_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        ids = eos if isinstance(eos, list) else [eos]
        return [i for i in ids + [self.tokenizer.eos_token_id] if i is not None]


def build(cfg: ModelConfig) -> HFEngine:
    """The ``hf`` backend's engine for one model role (:mod:`genpi.engines.backends`)."""
    return HFEngine(
        cfg.name,
        dtype=cfg.dtype,
        device=cfg.device,
        batch_size=cfg.batch_size,
        max_context=cfg.max_context,
        threads=cfg.threads,
        prefix_sharing=cfg.prefix_sharing,
    )
