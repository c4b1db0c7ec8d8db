"""Analytic FLOPs against torch's flop counter, episode accounting, and the timed episode on the tiny model."""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicCache

from genpi.errors import GenPIError
from genpi.evaluate.efficiency import (
    episode_prefill_flops,
    forward_flops,
    measure_episode_latency,
    play_timed_episode,
)

pytestmark = pytest.mark.timeout(180)

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_config(**overrides: Any) -> LlamaConfig:
    sizes = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        attn_implementation="sdpa",
    )
    return LlamaConfig(**{**sizes, **overrides})


def counted(model: Any, **inputs: Any) -> int:
    """FLOPs torch's flop counter sees in one forward.

    CPU's fused SDPA kernel (``_scaled_dot_product_flash_attention_for_cpu``) has no formula in the
    flop counter, so attention would count as zero; the math backend runs SDPA as two counted
    ``bmm``s over every (query, key) pair, as the counter's own SDPA formula does.
    """
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**inputs)
    return counter.get_total_flops()


@pytest.fixture(scope="module", params=[{}, {"head_dim": 24}], ids=["head_dim=16", "head_dim=24"])
def model(request: pytest.FixtureRequest) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(**request.param)).eval()


def prefilled_cache(model: Any, tokens: int) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.randint(0, 128, (1, tokens)), cache=cache, use_cache=True)
    return cache


# ---------------------------------------------------------------------------- forward FLOPs


def test_forward_flops_by_hand() -> None:
    config = SimpleNamespace(
        hidden_size=2,
        intermediate_size=3,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=2,
        vocab_size=5,
    )
    # q, k, v, o: 2·2·2 each; gate, up, down: 2·2·3 each; attention: 2·2·(1 query · 1 key · dim 2); head 2·2·5
    assert forward_flops(config, 1, 0, 1) == 4 * 8 + 3 * 12 + 8 + 20
    # LoRA r=1 adds 2·1·(in + out) per linear: 4 · 2·4 + 3 · 2·5
    assert forward_flops(config, 1, 0, 1, lora_rank=1) == 96 + 4 * 8 + 3 * 10
    # one more cached key adds one score and one weighted value: 2·2·(1·1·2)
    assert forward_flops(config, 1, 1, 0) == 96 - 20 + 8


def test_prefill_flops_match_the_flop_counter(model: LlamaForCausalLM) -> None:
    ids = torch.randint(0, 128, (1, 7))
    assert forward_flops(model.config, 7, 0, 1) == counted(model, input_ids=ids, logits_to_keep=1)
    assert forward_flops(model.config, 7, 0, 7) == counted(model, input_ids=ids, logits_to_keep=0)


def test_cached_forward_flops_match_the_flop_counter(model: LlamaForCausalLM) -> None:
    cache = prefilled_cache(model, 5)
    ids = torch.randint(0, 128, (1, 3))
    measured = counted(model, input_ids=ids, cache=cache, use_cache=True, logits_to_keep=0)
    assert forward_flops(model.config, 3, 5, 3) == measured
    assert forward_flops(model.config, 3, 0, 3) < measured  # the cached keys are attended over


@pytest.mark.parametrize("layers", [None, 1])
def test_lora_flops_match_the_flop_counter(model: LlamaForCausalLM, layers: int | None) -> None:
    lora = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LINEARS, layers_to_transform=[1] if layers else None
    )
    peft_model = get_peft_model(model, lora).eval()
    try:
        cache = prefilled_cache(peft_model, 4)
        ids = torch.randint(0, 128, (1, 3))
        measured = counted(peft_model, input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        assert forward_flops(model.config, 3, 4, 1, lora_rank=4, lora_layers=layers) == measured
        assert forward_flops(model.config, 3, 4, 1) < measured
    finally:
        peft_model.unload()  # the module-scoped base model goes back to plain linears


def test_config_without_the_needed_sizes_is_named() -> None:
    with pytest.raises(GenPIError, match="intermediate_size"):
        forward_flops(SimpleNamespace(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, vocab_size=4), 1, 0, 1)


# ---------------------------------------------------------------------------- episode FLOPs


def test_episode_flops_per_turn_and_totals() -> None:
    config = tiny_config()
    lora = {"lora_rank": 8, "lora_layers": 1}
    result = episode_prefill_flops(config, 100, [(10, 5), (8, 4)], **lora)
    per_turn = result["per_turn"]
    # turn 2: history 15 tokens; it reads 8 new ones
    assert per_turn["recompute"][1] == forward_flops(config, 100 + 15 + 8, 0, 1)
    assert per_turn["kv_reuse"][1] == forward_flops(config, 8, 115, 1)
    assert per_turn["adapter"][1] == forward_flops(config, 8, 15, 1, **lora)
    assert per_turn["kv_reuse"][0] == forward_flops(config, 10, 100, 1)  # the prompt's cache is shared
    assert result["prompt_prefill_flops"] == forward_flops(config, 100, 0, 0)
    assert result["total"] == {mode: sum(values) for mode, values in per_turn.items()}
    assert result["prompt_tokens_avoided_per_turn"] == 100
    for turn in range(2):
        assert per_turn["adapter"][turn] < per_turn["kv_reuse"][turn] < per_turn["recompute"][turn]
    assert 0 < result["theoretical_saving"] < result["theoretical_saving_vs_recompute"] < 1
    assert result["theoretical_saving"] == pytest.approx(1 - result["total"]["adapter"] / result["total"]["kv_reuse"])
    # decode: turn 1 writes 5 tokens one at a time after 110 tokens of context
    assert result["decode_flops"]["kv_reuse"][0] == sum(forward_flops(config, 1, 110 + k, 1) for k in range(5))
    assert result["decode_flops"]["recompute"] == result["decode_flops"]["kv_reuse"]
    assert result["decode_flops"]["adapter"][0] == sum(forward_flops(config, 1, 10 + k, 1, **lora) for k in range(5))


def test_without_a_prompt_the_adapter_saves_nothing_or_costs_more() -> None:
    config = tiny_config()
    plain = episode_prefill_flops(config, 0, [(10, 5), (8, 4)])
    assert plain["per_turn"]["adapter"] == plain["per_turn"]["kv_reuse"]
    assert plain["theoretical_saving"] == 0.0
    with_lora = episode_prefill_flops(config, 0, [(10, 5), (8, 4)], lora_rank=8)
    assert with_lora["theoretical_saving"] < 0  # the LoRA matmuls are pure extra cost


def test_empty_episode_has_no_saving() -> None:
    result = episode_prefill_flops(tiny_config(), 100, [])
    assert result["total"] == {"recompute": 0, "kv_reuse": 0, "adapter": 0}
    assert result["theoretical_saving"] is None and result["theoretical_saving_vs_recompute"] is None


# ---------------------------------------------------------------------------- timed episode

PROMPT = [{"role": "system", "content": "You are a shell agent. Reply with Think: and Act: lines. " * 4}]
TURNS = [
    ("How many files are in /tmp?", "Think: list them.\nAct: bash\n```bash\nls /tmp | wc -l\n```"),
    ("Output: 12", "Think: done.\nAct: answer(12)"),
    ("Now count /var too.", "Think: same again.\nAct: bash\n```bash\nls /var | wc -l\n```"),
]
NEW_TOKENS = 3


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    from genpi.engines.hf import load_model_and_tokenizer
    from genpi.models import TINY

    return load_model_and_tokenizer(TINY, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def episodes(tiny: tuple[Any, Any]) -> dict[str, dict[str, Any]]:
    """Each mode's episode (and recompute without the prompt): seconds, greedy tokens, prefill lengths."""
    model, tokenizer = tiny
    runs = {
        "recompute": (PROMPT, "recompute"),
        "kv_reuse": (PROMPT, "kv_reuse"),
        "adapter": (PROMPT, "adapter"),
        "no_prompt": ([], "recompute"),
    }
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from threads, and loses much on a busy machine
    for name, (prompt, mode) in runs.items():
        lengths: list[int] = []
        forward = model.forward

        @functools.wraps(forward)
        def recording(*args: Any, **kwargs: Any) -> Any:
            lengths.append(kwargs["input_ids"].shape[1])  # noqa: B023 (called within this iteration)
            return forward(*args, **kwargs)  # noqa: B023

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(model, "forward", recording)
            seconds, tokens = play_timed_episode(model, tokenizer, prompt, TURNS, NEW_TOKENS, mode)
        ahead = lengths.pop(0) if mode == "kv_reuse" else 0  # the prompt's cache, computed before the episode
        out[name] = {"seconds": seconds, "tokens": tokens, "prefill": lengths[::NEW_TOKENS], "ahead": ahead}
    torch.set_num_threads(threads)
    return out


def test_every_mode_times_every_turn(episodes: dict[str, dict[str, Any]]) -> None:
    for mode in ("recompute", "kv_reuse", "adapter"):
        seconds = episodes[mode]["seconds"]
        assert len(seconds) == len(TURNS) and all(isinstance(s, float) and s > 0 for s in seconds)


def test_measure_episode_latency_returns_the_seconds(tiny: tuple[Any, Any]) -> None:
    seconds = measure_episode_latency(*tiny, PROMPT, TURNS[:1], 1, "kv_reuse")
    assert len(seconds) == 1 and seconds[0] > 0


def test_kv_reuse_generates_what_recompute_generates(episodes: dict[str, dict[str, Any]]) -> None:
    recomputed, reused = episodes["recompute"]["tokens"], episodes["kv_reuse"]["tokens"]
    assert [len(t) for t in recomputed] == [NEW_TOKENS] * len(TURNS)  # exactly new_tokens, even past an end token
    assert reused[0] == recomputed[0]
    assert reused == recomputed  # later turns too: the kept cache holds the same history
    assert episodes["adapter"]["tokens"] == episodes["no_prompt"]["tokens"]  # the adapter mode leaves the prompt out
    assert episodes["adapter"]["tokens"] != recomputed  # ... and the prompt changes what the model says


def test_kv_reuse_prefills_only_unseen_tokens(tiny: tuple[Any, Any], episodes: dict[str, dict[str, Any]]) -> None:
    _, tokenizer = tiny
    messages: list[dict[str, str]] = [dict(m) for m in PROMPT]
    full = []
    for said, reply in TURNS:
        messages.append({"role": "user", "content": said})
        full.append(
            len(
                tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
                    "input_ids"
                ]
            )
        )
        messages.append({"role": "assistant", "content": reply})
    assert episodes["recompute"]["prefill"] == full
    reuse = episodes["kv_reuse"]["prefill"]
    # the prompt's KV cache is computed ahead of the episode: turn 1 prefills only what follows it
    prompt_ids = tokenizer.apply_chat_template([dict(m) for m in PROMPT], tokenize=True, return_dict=True)["input_ids"]
    first = tokenizer.apply_chat_template(
        [*PROMPT, {"role": "user", "content": TURNS[0][0]}], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    shared = next((k for k, (a, b) in enumerate(zip(prompt_ids, first)) if a != b), len(prompt_ids))
    assert episodes["kv_reuse"]["ahead"] == len(prompt_ids) and reuse[0] == full[0] - shared < full[0]
    # later turns prefill only what the conversation gained since the last turn: the reply and the new input
    assert reuse[1:] == [full[t] - full[t - 1] for t in range(1, len(TURNS))]
    assert episodes["adapter"]["prefill"][1:] == reuse[1:]  # the same turns, without the prompt before them


def test_unknown_mode_is_refused(tiny: tuple[Any, Any]) -> None:
    with pytest.raises(ValueError, match="kv_reuse"):
        measure_episode_latency(*tiny, PROMPT, TURNS, 2, "cached")
