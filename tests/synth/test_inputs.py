"""Pseudo inputs: parsing the generator's lists, dedup, rounds, stored rounds, sampling."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from genpi.config import SynthConfig
from genpi.engines.base import Generation
from genpi.store import LocalStore
from genpi.synth.inputs import generate_inputs, normalize, parse_candidates
from tests.fakes import FakeEngine, World, kind_of, mini_spec, requested_count

SPEC = mini_spec()


def synth_cfg(**changes) -> SynthConfig:
    return dataclasses.replace(SynthConfig(), **changes)


# ------------------------------------------------------------------ parse_candidates


def test_parse_numbered_list_with_preamble_and_quotes() -> None:
    reply = (
        "Here are three requests:\n\n"
        '1. "Count the files in /tmp."\n'
        "2) List users with a login shell\n"
        "  3: 'Show the kernel version'  \n"
        "10 - “Free disk space on /”\n"
    )
    assert parse_candidates(reply) == [
        "Count the files in /tmp.",
        "List users with a login shell",
        "Show the kernel version",
        "Free disk space on /",
    ]


def test_parse_bulleted_list() -> None:
    reply = "- Restart nginx\n* Print the date\n• Compress /var/log into logs.tgz\n"
    assert parse_candidates(reply) == ["Restart nginx", "Print the date", "Compress /var/log into logs.tgz"]


def test_parse_keeps_only_list_items() -> None:
    reply = '6. Count the files in /tmp.\n```python\nfor x in y:\n```\n7.\n8. "Show the uptime of the machine"\nDone.\n'
    assert parse_candidates(reply) == ["Count the files in /tmp.", "Show the uptime of the machine"]
    assert parse_candidates("Count the files in /tmp.\nShow the uptime.") == []
    assert parse_candidates("") == []


# ------------------------------------------------------------------ generate_inputs


def scripted_replies(*replies: str) -> FakeEngine:
    """A generator whose n-th conversation overall gets the n-th reply (then empty replies)."""
    queue = list(replies)
    return FakeEngine(lambda conv, params: queue.pop(0) if queue else "")


def test_generate_inputs_dedups_rejects_and_counts(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    gen = scripted_replies(
        " Find the five largest files in /var.\n"
        "2. ls\n"  # too short
        "3.   find the FIVE largest   files in /var.  \n"  # duplicate once case/space folded
        "4. count the lines of /etc/passwd.\n",  # copies example input 1
        " Show which process listens on port 80.\n"
        "2. Find the five largest files in /var.\n",  # duplicate across requests
    )
    cfg = synth_cfg(num_inputs=10, inputs_per_request=5, max_input_rounds=1, seed=3)
    kept, stats = generate_inputs(SPEC, cfg, gen, store, "p/inputs")
    assert kept == ["Find the five largest files in /var.", "Show which process listens on port 80."]
    assert stats.candidates == 6
    assert stats.duplicates == 2
    assert stats.rejected == 2
    assert stats.reasons == {"too_short": 1, "copies_an_example": 1}
    assert stats.kept == 2 and stats.rounds == 1
    # one generate call, asking ceil(2 * 10 / 5) = 4 requests of 5 inputs each
    assert len(gen.calls) == 1
    convs, _ = gen.calls[0]
    assert len(convs) == 4 and stats.requests == 4
    assert all(kind_of(c) == "inputs" and requested_count(c) == 5 for c in convs)
    assert all(SPEC.text() in c[1]["content"] for c in convs)
    # the answer is prefilled with the prompt's example inputs as the start of the list
    shown = min(cfg.demos_per_request, len(SPEC.example_inputs))
    assert all(c[-1]["role"] == "assistant" and c[-1]["content"].endswith(f"\n{shown + 1}.") for c in convs)
    listed = [line.split(". ", 1)[1] for line in convs[0][-1]["content"].splitlines()[:-1]]
    assert len(listed) == shown and set(listed) <= set(SPEC.example_inputs)


def test_generate_inputs_drops_the_item_the_token_limit_cut(tmp_path: Path) -> None:
    cut = Generation(" Find the five largest files in /var.\n7. Show which process listens on port", "length", 50, 30)
    gen = FakeEngine(lambda conv, params: cut)
    cfg = synth_cfg(num_inputs=1, inputs_per_request=5, max_input_rounds=1)
    kept, stats = generate_inputs(SPEC, cfg, gen, LocalStore(tmp_path), "p/inputs")
    assert kept == ["Find the five largest files in /var."] and stats.cut_off == 1
    whole = FakeEngine(lambda conv, params: Generation(cut.text + " 80.", "stop", 50, 31))
    kept, stats = generate_inputs(
        SPEC,
        synth_cfg(num_inputs=2, inputs_per_request=5, max_input_rounds=1),
        whole,
        LocalStore(tmp_path / "whole"),
        "p/inputs",
    )
    assert kept[1] == "Show which process listens on port 80." and stats.cut_off == 0
    # a reply that is one long item cut off keeps it (some inputs are longer than the limit)
    alone = FakeEngine(lambda conv, params: Generation(" Summarize this email: Dear team, the", "length", 50, 30))
    kept, stats = generate_inputs(SPEC, cfg, alone, LocalStore(tmp_path / "alone"), "p/inputs")
    assert kept == ["Summarize this email: Dear team, the"] and stats.cut_off == 0


def test_generate_inputs_drops_near_duplicates_by_sentence_embedding(tmp_path: Path) -> None:
    from genpi.embeddings import load_embedder

    gen = scripted_replies(
        " Find the five largest files in /var.\n"
        "2. Find the 5 biggest files in /var.\n"  # a paraphrase of the first
        "3. Show which process listens on port 80.\n"
        "4. Count the lines of the file /etc/passwd.\n",  # a paraphrase of an example input
    )
    cfg = synth_cfg(num_inputs=10, inputs_per_request=5, max_input_rounds=1, near_duplicate_threshold=0.9)
    kept, stats = generate_inputs(SPEC, cfg, gen, LocalStore(tmp_path), "p/inputs", load_embedder().embed)
    assert kept == ["Find the five largest files in /var.", "Show which process listens on port 80."]
    assert stats.near_duplicates == 2 and stats.duplicates == 0 and stats.kept == 2
    off = synth_cfg(num_inputs=10, inputs_per_request=5, max_input_rounds=1, near_duplicate_threshold=0.0)
    again = scripted_replies(" Find the five largest files in /var.\n2. Find the 5 biggest files in /var.")
    kept, stats = generate_inputs(SPEC, off, again, LocalStore(tmp_path / "off"), "p/inputs", load_embedder().embed)
    assert len(kept) == 2 and stats.near_duplicates == 0


def test_generate_inputs_stops_at_num_inputs(tmp_path: Path) -> None:
    world = World(SPEC)
    gen = FakeEngine(world)
    cfg = synth_cfg(num_inputs=3, inputs_per_request=5, max_input_rounds=5)
    kept, stats = generate_inputs(SPEC, cfg, gen, LocalStore(tmp_path), "p/inputs")
    assert len(kept) == 3 and stats.kept == 3
    assert kept == [f"Report the size of the folder /data/set{k} in bytes." for k in range(3)]
    assert len(gen.calls) == 1 and stats.rounds == 1
    assert len(gen.calls[0][0]) == 2  # ceil(2 * 3 / 5)


def test_generate_inputs_runs_more_rounds_until_enough(tmp_path: Path) -> None:
    # every request yields one new unique input and one repeat of the first ever input
    counter = iter(range(1000))

    def reply(conv, params):
        return f" Delete old files in /tmp/cache{next(counter)}\n2. Delete old files in /tmp/cache0"

    gen = FakeEngine(reply)
    cfg = synth_cfg(num_inputs=5, inputs_per_request=2, max_input_rounds=8)
    kept, stats = generate_inputs(SPEC, cfg, gen, LocalStore(tmp_path), "p/inputs")
    assert kept == [f"Delete old files in /tmp/cache{k}" for k in range(5)]
    # round 0 asks ceil(2*5/2)=5 requests -> 5 unique; done after one round
    assert [len(c) for c, _ in gen.calls] == [5]
    gen2 = FakeEngine(lambda conv, params: " Delete old files in /tmp/only-this-one")
    kept2, stats2 = generate_inputs(SPEC, cfg, gen2, LocalStore(tmp_path / "b"), "p/inputs")
    assert kept2 == ["Delete old files in /tmp/only-this-one"]
    assert stats2.rounds == 8 and len(gen2.calls) == 8  # gives up after max_input_rounds
    assert [len(c) for c, _ in gen2.calls] == [5] + [4] * 7  # asks for what is still missing
    assert stats2.duplicates == 5 + 4 * 7 - 1


def test_generate_inputs_reuses_stored_rounds(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    cfg = synth_cfg(num_inputs=4, inputs_per_request=2, max_input_rounds=3)
    first = FakeEngine(World(SPEC))
    kept, stats = generate_inputs(SPEC, cfg, first, store, "p/inputs")
    assert store.exists("p/inputs/round-000.jsonl") and len(first.calls) == 1

    again = FakeEngine(lambda conv, params: pytest.fail("the generator must not be called on a rerun"))
    kept2, stats2 = generate_inputs(SPEC, cfg, again, store, "p/inputs")
    assert again.calls == []
    assert kept2 == kept and vars(stats2) == vars(stats)


def test_generate_inputs_uses_configured_sampling(tmp_path: Path) -> None:
    gen = FakeEngine(World(SPEC))
    cfg = synth_cfg(
        num_inputs=2, inputs_per_request=2, input_temperature=0.85, input_top_p=0.77, input_max_tokens=123, seed=11
    )
    generate_inputs(SPEC, cfg, gen, LocalStore(tmp_path), "p/inputs")
    params = gen.calls[0][1]
    assert (params.temperature, params.top_p, params.max_new_tokens) == (0.85, 0.77, 123)
    assert params.seed == 11  # seed + round 0


def test_normalize_folds_case_and_whitespace() -> None:
    assert normalize("  Find  THE\tfiles\n") == "find the files"
