"""What leaving the prompt out saves: analytic FLOPs and measured latency of a multi-turn episode.

Three ways to serve an agent episode are compared:

- ``recompute``: prompt and whole history re-prefilled every turn, no cache kept between turns;
- ``kv_reuse``: the prompt's and the history's KV cache kept; each turn prefills only its new
  tokens, which still attend over the prompt and the history;
- ``adapter``: no prompt at all (the LoRA adapter stands in for it); history kept in cache; the
  LoRA matmuls are added.

FLOPs count every matmul as ``2·m·n·k``, as ``torch.utils.flop_counter`` does; element-wise work
(norms, RoPE, softmax, activations) is left out.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from genpi.chat import chat_ids, common_prefix
from genpi.errors import ModelError

MODES = ("recompute", "kv_reuse", "adapter")


# ---------------------------------------------------------------------------- FLOPs


def forward_flops(
    config: Any,
    new_tokens: int,
    cached_tokens: int,
    logits_tokens: int,
    lora_rank: int = 0,
    lora_layers: int | None = None,
) -> int:
    """FLOPs of one forward of ``new_tokens`` over ``cached_tokens`` of KV cache (batch 1).

    Counts, per layer, the q/k/v/o projections, the gated MLP (gate, up, down), attention
    scores and weighted values of every new token over all ``cached + new`` keys (not halved for
    causality, as the flop counter counts SDPA), the LM head on ``logits_tokens`` positions, and
    with ``lora_rank > 0`` the LoRA A and B matmuls on all seven linears of the top
    ``lora_layers`` layers (None or 0: every layer). ``config`` is a Llama-like transformers config.
    """
    for name, value in (
        ("new_tokens", new_tokens),
        ("cached_tokens", cached_tokens),
        ("logits_tokens", logits_tokens),
        ("lora_rank", lora_rank),
    ):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    shape = _shape(config)
    linears = _linears(shape)
    per_token = sum(2 * d_in * d_out for d_in, d_out in linears)
    attention = 2 * 2 * shape["heads"] * shape["head_dim"] * new_tokens * (cached_tokens + new_tokens)
    flops = shape["layers"] * (new_tokens * per_token + attention)
    flops += 2 * logits_tokens * shape["hidden"] * shape["vocab"]
    if lora_rank:
        adapted = min(lora_layers or shape["layers"], shape["layers"])
        flops += adapted * new_tokens * sum(2 * lora_rank * (d_in + d_out) for d_in, d_out in linears)
    return flops


def episode_prefill_flops(
    config: Any,
    prompt_tokens: int,
    turn_tokens: list[tuple[int, int]],
    lora_rank: int = 0,
    lora_layers: int | None = None,
) -> dict[str, Any]:
    """Per-turn and total prefill FLOPs of an episode served the three ways (see the module doc).

    ``turn_tokens[i] = (read, written)``: the tokens the agent reads new at turn i (user input or
    observation with chat framing) and the tokens it writes. The context of turn i is the prompt
    (not for ``adapter``) plus all earlier reads and writes. Every prefill computes logits for
    its last position only. The prompt's own KV cache in ``kv_reuse`` is computed once and shared
    by every episode (prefix caching), so it is reported as ``prompt_prefill_flops`` and not
    charged to the episode: the comparison favours the baseline.

    ``decode_flops`` counts generation separately: the written tokens of a turn are fed one at a
    time over the growing context (the same for ``recompute`` and ``kv_reuse``, whose contexts are
    equal). ``theoretical_saving`` is ``1 - adapter/kv_reuse`` of the prefill totals,
    ``theoretical_saving_vs_recompute`` the same against ``recompute``; None for an empty episode.
    """
    if prompt_tokens < 0 or any(r < 0 or w < 0 for r, w in turn_tokens):
        raise ValueError(f"token counts must be >= 0, got prompt {prompt_tokens} and turns {turn_tokens}")
    lora = {"lora_rank": lora_rank, "lora_layers": lora_layers}
    prefill: dict[str, list[int]] = {mode: [] for mode in MODES}
    decode: dict[str, list[int]] = {mode: [] for mode in MODES}
    history = 0
    for read, written in turn_tokens:
        prefill["recompute"].append(forward_flops(config, prompt_tokens + history + read, 0, 1))
        prefill["kv_reuse"].append(forward_flops(config, read, prompt_tokens + history, 1))
        prefill["adapter"].append(forward_flops(config, read, history, 1, **lora))
        with_prompt = _decode(config, prompt_tokens + history + read, written, {})
        decode["recompute"].append(with_prompt)
        decode["kv_reuse"].append(with_prompt)
        decode["adapter"].append(_decode(config, history + read, written, lora))
        history += read + written
    total = {mode: sum(values) for mode, values in prefill.items()}
    return {
        "prompt_tokens": prompt_tokens,
        "prompt_tokens_avoided_per_turn": prompt_tokens,
        "prompt_prefill_flops": forward_flops(config, prompt_tokens, 0, 0),
        "per_turn": prefill,
        "total": total,
        "decode_flops": decode,
        "decode_total": {mode: sum(values) for mode, values in decode.items()},
        "theoretical_saving": _saving(total["adapter"], total["kv_reuse"]),
        "theoretical_saving_vs_recompute": _saving(total["adapter"], total["recompute"]),
    }


def _decode(config: Any, context: int, written: int, lora: dict[str, Any]) -> int:
    """FLOPs of feeding ``written`` generated tokens one by one after ``context`` tokens."""
    return sum(forward_flops(config, 1, context + k, 1, **lora) for k in range(written))


def _saving(adapter: int, baseline: int) -> float | None:
    return 1 - adapter / baseline if baseline else None


def _shape(config: Any) -> dict[str, int]:
    """The sizes the FLOPs formula needs, read from a Llama-like config."""
    names = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [n for n in names if getattr(config, n, None) is None]
    if missing:
        raise ModelError(
            f"model config {type(config).__name__} lacks {', '.join(missing)}; the FLOPs formula "
            "needs a Llama-like decoder config (hidden_size, intermediate_size, num_hidden_layers, "
            "num_attention_heads, vocab_size)"
        )
    heads = int(config.num_attention_heads)
    return {
        "hidden": int(config.hidden_size),
        "inter": int(config.intermediate_size),
        "layers": int(config.num_hidden_layers),
        "heads": heads,
        "kv_heads": int(getattr(config, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(config, "head_dim", None) or config.hidden_size // heads),
        "vocab": int(config.vocab_size),
    }


def _linears(s: dict[str, int]) -> list[tuple[int, int]]:
    """(in, out) features of q, k, v, o, gate, up, down."""
    h, q, kv, i = s["hidden"], s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"], s["inter"]
    return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]


# ---------------------------------------------------------------------------- latency


def measure_episode_latency(
    model: Any,
    tokenizer: Any,
    prompt_messages: list[dict[str, str]],
    turns: list[tuple[str, str]],
    new_tokens: int,
    mode: str,
) -> list[float]:
    """Wall seconds per turn of a timed episode served in ``mode`` (see :func:`play_timed_episode`)."""
    return play_timed_episode(model, tokenizer, prompt_messages, turns, new_tokens, mode)[0]


@torch.inference_mode()
def play_timed_episode(
    model: Any,
    tokenizer: Any,
    prompt_messages: list[dict[str, str]],
    turns: list[tuple[str, str]],
    new_tokens: int,
    mode: str,
) -> tuple[list[float], list[list[int]]]:
    """Per-turn wall seconds and greedy token ids of an episode on a loaded eval-mode model.

    Each turn the agent reads ``turns[i][0]`` and generates exactly ``new_tokens`` tokens
    greedily; then ``turns[i][1]`` (the recorded reply) joins the history instead of what it
    generated, so every mode processes the same tokens. ``recompute`` prefills prompt and
    history every turn; ``kv_reuse`` keeps one KV cache across turns and prefills only the
    tokens it has not seen; ``adapter`` is ``kv_reuse`` without ``prompt_messages`` (pass a
    model with the adapter active). The first input joins a trailing user turn of the
    prompt, as :meth:`PromptSpec.messages_with_input` does. Time covers model work only.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    from transformers.cache_utils import DynamicCache

    messages = [] if mode == "adapter" else [dict(m) for m in prompt_messages]
    cache = DynamicCache(config=model.config)
    seen: list[int] = []  # the tokens whose KV the cache holds
    if mode == "kv_reuse" and messages:
        # The baseline the paper compares with: the prompt's KV cache is computed once, ahead of
        # every episode, so its prefill is not part of any turn's time.
        seen = chat_ids(tokenizer, messages)
        with torch.inference_mode():
            model(input_ids=torch.tensor([seen], device=model.device), cache=cache, use_cache=True)
    seconds: list[float] = []
    generated: list[list[int]] = []
    eos = tokenizer.eos_token_id
    for said, reply in turns:
        _add_user_turn(messages, said)
        ids = chat_ids(tokenizer, messages, generation_prompt=True)
        if mode == "recompute":
            cache, seen = DynamicCache(config=model.config), []
        keep = min(common_prefix([seen, ids]), len(ids) - 1)  # at least one token left to prefill
        _sync(model)
        start = time.perf_counter()
        if cache.get_seq_length() > keep:
            cache.crop(keep - cache.get_seq_length())
        input_ids = torch.tensor([ids], device=model.device)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            cache=cache,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            top_k=None,
            top_p=None,
            temperature=None,
            pad_token_id=eos,
        )
        _sync(model)
        seconds.append(time.perf_counter() - start)
        generated.append(out[0, len(ids) :].tolist())
        cache.crop(len(ids) - cache.get_seq_length())  # drop the generated tokens: the recorded reply follows
        seen = ids
        messages.append({"role": "assistant", "content": reply})
    return seconds, generated


def _add_user_turn(messages: list[dict[str, str]], text: str) -> None:
    if messages and messages[-1]["role"] == "user":
        messages[-1]["content"] += "\n\n" + text
    else:
        messages.append({"role": "user", "content": text})


def _sync(model: Any) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
