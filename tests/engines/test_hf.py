"""The transformers engine on the tiny random model, and the model registry."""

from __future__ import annotations

import json

import pytest

from genpi.engines.base import SamplingParams
from genpi.engines.hf import HFEngine
from genpi.errors import ModelError
from genpi.models import TINY, resolve_model

pytestmark = pytest.mark.timeout(180)

CONVERSATIONS = [
    [{"role": "user", "content": "List the files in /tmp."}],
    [
        {"role": "system", "content": "You are a shell agent. Answer with Act: bash."},
        {"role": "user", "content": "How much disk space is free on the root filesystem of this machine?"},
    ],
    [{"role": "user", "content": "hi"}],
]


@pytest.fixture(scope="module")
def engine() -> HFEngine:
    return HFEngine(TINY, batch_size=2)


def test_greedy_batched_equals_one_by_one(engine: HFEngine) -> None:
    params = SamplingParams(max_new_tokens=12)
    together = engine.generate(CONVERSATIONS, params)
    alone = [engine.generate([c], params)[0] for c in CONVERSATIONS]
    assert [g.text for g in together] == [g.text for g in alone]
    assert all(g.text for g in together)  # the untied tiny model says something
    assert [g.prompt_tokens for g in together] == engine.count_tokens(CONVERSATIONS)


def test_sampling_is_seeded(engine: HFEngine) -> None:
    first = engine.generate(CONVERSATIONS, SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=5))
    again = engine.generate(CONVERSATIONS, SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=5))
    other = engine.generate(CONVERSATIONS, SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=6))
    assert [g.text for g in first] == [g.text for g in again]
    assert [g.text for g in first] != [g.text for g in other]


def test_finish_reasons(engine: HFEngine) -> None:
    gen = engine.generate(CONVERSATIONS[:1], SamplingParams(max_new_tokens=5))[0]
    assert gen.finish_reason == "length" and gen.output_tokens == 5
    too_long = [{"role": "user", "content": "word " * 5000}]
    gen = engine.generate([too_long] + CONVERSATIONS[:1], SamplingParams(max_new_tokens=5))
    assert gen[0].finish_reason == "context" and gen[0].text == "" and gen[0].output_tokens == 0
    assert gen[1].finish_reason == "length"  # the others still run


def test_stop_string_cuts_and_is_reported(engine: HFEngine) -> None:
    full = engine.generate(CONVERSATIONS[:1], SamplingParams(max_new_tokens=16))[0].text
    word = full.split()[2]
    cut = engine.generate(CONVERSATIONS[:1], SamplingParams(max_new_tokens=16, stop=(word,)))[0]
    assert cut.stop_string == word and cut.finish_reason == "stop"
    assert word not in cut.text and full.startswith(cut.text)


def test_registry_names_and_folders(tmp_path) -> None:
    folder = resolve_model(TINY)
    assert (folder / "config.json").is_file() and resolve_model(str(folder)) == folder
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in json.loads((resolve_model("smollm2-135m-instruct") / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    with pytest.raises(ModelError, match="unknown model 'llama-9000'.*smollm2-135m-instruct"):
        resolve_model("llama-9000")
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_model(str(tmp_path))


def test_shared_prefix_cache_gives_the_same_outputs() -> None:
    prompt = [{"role": "system", "content": "You operate a Linux shell. " * 20}]
    conversations = [
        prompt + [{"role": "user", "content": q}]
        for q in ("List /tmp.", "Show the kernel version, please.", "Count users.")
    ]
    conversations.append([{"role": "user", "content": "no prompt here"}])
    params = SamplingParams(max_new_tokens=10)
    plain = HFEngine(TINY, dtype="float32", batch_size=4, prefix_sharing=False)
    shared = HFEngine(TINY, dtype="float32", batch_size=4, prefix_sharing=True)
    assert shared._shared_prefix([shared.encode(c) for c in conversations[:3]])[0] > 100
    assert [g.text for g in shared.generate(conversations, params)] == [
        g.text for g in plain.generate(conversations, params)
    ]


def test_kept_turns_prefill_only_new_tokens_and_give_the_same_outputs() -> None:
    """Three-turn conversations, the way role play calls the engine: with each conversation's KV
    kept between calls, every call after the first prefills only what was added to it, and the
    replies are the ones an engine that prefills everything gives (float32, greedy)."""
    prompt = [{"role": "system", "content": "You operate a Linux shell. Reply with one Act: line. " * 12}]
    questions = ("List /tmp.", "Show the kernel version, please.", "Count users.", "Print the date.")
    params = SamplingParams(max_new_tokens=8)

    def play(engine: HFEngine) -> tuple[list[list[str]], list[int]]:
        chats = [prompt + [{"role": "user", "content": q}] for q in questions]
        replies, prefilled, growth, sizes = [], [], [], [0] * len(chats)
        for turn in range(3):
            before = engine.prefilled_tokens
            out = engine.generate(chats, params)
            prefilled.append(engine.prefilled_tokens - before)
            now = [len(engine.encode(c)) for c in chats]
            growth.append(sum(n - s for n, s in zip(now, sizes)))  # tokens added since the last call
            sizes = now
            replies.append([g.text for g in out])
            chats = [
                c + [{"role": "assistant", "content": g.text}, {"role": "user", "content": f"Output: {turn}"}]
                for c, g in zip(chats, out)
            ]
        return replies, prefilled, growth

    whole = HFEngine(TINY, dtype="float32", batch_size=4, turn_cache_mib=0)
    kept = HFEngine(TINY, dtype="float32", batch_size=4)
    whole_replies, whole_prefill, growth = play(whole)
    kept_replies, kept_prefill, _ = play(kept)
    assert kept_replies == whole_replies
    assert kept_prefill[0] == whole_prefill[0]  # nothing kept yet: the prompt shared once, as before
    for turn in (1, 2):  # what an earlier call saw comes from the cache; only what was added is prefilled
        assert kept_prefill[turn] <= growth[turn] < whole_prefill[turn]
    assert len(kept.turn_cache.entries) == len(questions)  # each conversation's previous turn superseded

    # a request repeated as it was is served afresh: the same answer as an engine that keeps nothing
    chats = [prompt + [{"role": "user", "content": q}] for q in questions]
    before = kept.prefilled_tokens
    assert [g.text for g in kept.generate(chats, params)] == whole_replies[0]
    assert kept.prefilled_tokens - before == whole_prefill[0]


def test_turn_cache_matches_later_turns_of_the_same_conversation_under_the_same_adapter() -> None:
    import torch

    from genpi.engines.turn_cache import TurnCache

    def kv(n: int):  # one layer, one row: 2 heads x n positions x 4 dims of float32 (32 bytes a position)
        return [(torch.zeros(1, 2, n, 4), torch.zeros(1, 2, n, 4))]

    cache = TurnCache(max_bytes=64 * 8)  # room for 8 positions of keys and values
    cache.put([1, 2, 3], [7], kv(4))
    first = next(iter(cache.entries))
    assert cache.match([1, 2, 3]) == (None, 0)  # the same request again: never from the cache
    assert cache.match([1, 2, 9, 9]) == (None, 0)  # another conversation with the same opening
    assert cache.match([1, 2, 3, 7, 5]) == (first, 4)  # a later turn: request and reply reused
    assert cache.match([1, 2, 3, 8, 5]) == (first, 3)  # the reply re-tokenized otherwise: the request only
    assert cache.match([1, 2, 3, 7, 5], tag="adapter") == (None, 0)  # other weights, other keys
    cache.put([1, 2, 3, 7, 5], [6], kv(6), continued=first)
    assert first not in cache.entries and cache.nbytes == 6 * 64  # the previous turn is superseded
    cache.put([4, 4], [4], kv(3))  # over the budget: the least recently used entry goes
    assert [len(e.ids) for e in cache.entries.values()] == [3] and cache.nbytes == 3 * 64


@pytest.mark.s3
def test_s3_model_folder_is_downloaded_once(s3_env, monkeypatch, tmp_path) -> None:
    from genpi.store import open_store

    local = resolve_model(TINY)  # before the cache moves
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env.endpoint_url)
    monkeypatch.setenv("GENPI_CACHE", str(tmp_path / "cache"))
    bucket = s3_env.create_bucket()
    store = open_store(f"s3://{bucket}")
    store.upload_dir(local, "models/tiny")
    url = f"s3://{bucket}/models/tiny"
    folder = resolve_model(url)
    assert folder.is_relative_to(tmp_path / "cache")
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (folder / name).read_bytes() == (local / name).read_bytes()
    store.delete_prefix("models/tiny")
    assert resolve_model(url) == folder  # cached: no second download
    store.put_text("broken/readme.txt", "not a model")
    with pytest.raises(ModelError, match=f"s3://{bucket}/broken has no config.json"):
        resolve_model(f"s3://{bucket}/broken")


def test_short_and_long_conversations_are_not_batched_together(engine: HFEngine) -> None:
    short = [[{"role": "user", "content": f"hi {k}"}] for k in range(3)]
    long = [[{"role": "system", "content": "You operate a Linux shell. " * 40}, {"role": "user", "content": "ls"}]]
    encoded = [engine.encode(c) for c in short + long]
    assert engine._chunks(encoded, [0, 1, 2, 3]) == [[0, 1], [2], [3]]  # batch_size 2, and the long one alone
    long_first = [encoded[3], encoded[0], encoded[1]]
    assert engine._chunks(long_first, [3, 0, 1]) == [[3], [0, 1]]  # a short one never joins a long one's batch
    assert [g.text for g in engine.generate(short + long, SamplingParams(max_new_tokens=6))] == [
        engine.generate([c], SamplingParams(max_new_tokens=6))[0].text for c in short + long
    ]
