"""Data synthesis on a scripted fake engine: inputs, outputs, reasons, role play and the shared
episode loop, the action-format filter, parts, quality report, the id-derived split, and the
resumable synthesis stage in a local store."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from genpi import artifacts
from genpi.config import GenPIConfig, SynthConfig, load_config
from genpi.prompt.views import NO_REASON, environment_conversation, environment_opening, teacher_messages
from genpi.engines.base import Generation, SamplingParams
from genpi.fingerprint import fingerprint
from genpi.prompt.episodes import CONTEXT, EMPTY, END_TOKEN, MAX_TURNS, Resampling, play_episodes
from genpi.prompt.splits import TEST, TRAIN, VAL, assign_splits
from genpi.store import LocalStore
from genpi.synth.format_filter import cut_at_off_format, filter_record
from genpi.synth.inputs import InputStats, generate_inputs, normalize, parse_candidates
from genpi.synth.outputs import single_turn_outputs
from genpi.synth.parts import run_in_parts
from genpi.synth.quality import quality_report
from genpi.synth.reasons import reasons
from genpi.synth.roleplay import max_turns_for, role_play
from genpi.synth.stage import TooFewInputs, join_by_id, reason_ids, synthesize
from tests.fakes import (FakeEngine, ScriptedFailure, World, agent_turns_so_far, kind_of, mini_spec,
                         requested_count, task_of)

SPEC = mini_spec()


def synth_cfg(**changes) -> SynthConfig:
    return dataclasses.replace(SynthConfig(), **changes)


# ------------------------------------------------------------------ parse_candidates

def test_parse_numbered_list_with_preamble_and_quotes() -> None:
    reply = ("Here are three requests:\n\n"
             "1. \"Count the files in /tmp.\"\n"
             "2) List users with a login shell\n"
             "  3: 'Show the kernel version'  \n"
             "10 - “Free disk space on /”\n")
    assert parse_candidates(reply) == ["Count the files in /tmp.", "List users with a login shell",
                                       "Show the kernel version", "Free disk space on /"]


def test_parse_bulleted_list() -> None:
    reply = "- Restart nginx\n* Print the date\n• Compress /var/log into logs.tgz\n"
    assert parse_candidates(reply) == ["Restart nginx", "Print the date", "Compress /var/log into logs.tgz"]


def test_parse_keeps_only_list_items() -> None:
    reply = "6. Count the files in /tmp.\n```python\nfor x in y:\n```\n7.\n8. \"Show the uptime of the machine\"\nDone.\n"
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
        "2. ls\n"                                           # too short
        "3.   find the FIVE largest   files in /var.  \n"    # duplicate once case/space folded
        "4. count the lines of /etc/passwd.\n",              # copies example input 1
        " Show which process listens on port 80.\n"
        "2. Find the five largest files in /var.\n",          # duplicate across requests
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
    kept, stats = generate_inputs(SPEC, synth_cfg(num_inputs=2, inputs_per_request=5, max_input_rounds=1),
                                  whole, LocalStore(tmp_path / "whole"), "p/inputs")
    assert kept[1] == "Show which process listens on port 80." and stats.cut_off == 0
    # a reply that is one long item cut off keeps it (some inputs are longer than the limit)
    alone = FakeEngine(lambda conv, params: Generation(" Summarize this email: Dear team, the", "length", 50, 30))
    kept, stats = generate_inputs(SPEC, cfg, alone, LocalStore(tmp_path / "alone"), "p/inputs")
    assert kept == ["Summarize this email: Dear team, the"] and stats.cut_off == 0


def test_generate_inputs_drops_near_duplicates_by_sentence_embedding(tmp_path: Path) -> None:
    from genpi.embeddings import load_embedder

    gen = scripted_replies(
        " Find the five largest files in /var.\n"
        "2. Find the 5 biggest files in /var.\n"                 # a paraphrase of the first
        "3. Show which process listens on port 80.\n"
        "4. Count the lines of the file /etc/passwd.\n",          # a paraphrase of an example input
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
    cfg = synth_cfg(num_inputs=2, inputs_per_request=2, input_temperature=0.85, input_top_p=0.77,
                    input_max_tokens=123, seed=11)
    generate_inputs(SPEC, cfg, gen, LocalStore(tmp_path), "p/inputs")
    params = gen.calls[0][1]
    assert (params.temperature, params.top_p, params.max_new_tokens) == (0.85, 0.77, 123)
    assert params.seed == 11  # seed + round 0


def test_normalize_folds_case_and_whitespace() -> None:
    assert normalize("  Find  THE\tfiles\n") == "find the files"


# ------------------------------------------------------------------ single-turn outputs and reasons

def test_single_turn_outputs_student_has_no_prompt_teacher_has_it() -> None:
    def reply(conv, params):
        return ("S:" if kind_of(conv) == "student" else "T:") + conv[-1]["content"].rsplit("\n\n", 1)[-1]

    target = FakeEngine(reply)
    inputs = [{"id": 7, "input": "Count the lines of /etc/hosts"}, {"id": 9, "input": "Show the date and time"}]
    cfg = synth_cfg(output_max_tokens=77, seed=4)
    rows = single_turn_outputs(SPEC, cfg, target, inputs)
    assert len(target.calls) == 1  # one batched call for students and teachers
    convs, params = target.calls[0]
    assert convs[:2] == [[{"role": "user", "content": x["input"]}] for x in inputs]
    assert convs[2:] == [teacher_messages(SPEC, x["input"]) for x in inputs]
    assert SPEC.turns[0].content in convs[2][0]["content"]
    assert params.temperature == 0.0 and params.max_new_tokens == 77
    assert [r["id"] for r in rows] == [7, 9]
    assert rows[0]["student"] == "S:Count the lines of /etc/hosts"
    assert rows[0]["teacher"] == "T:Count the lines of /etc/hosts"
    assert rows[1]["student"] == "S:Show the date and time" and rows[1]["teacher"] == "T:Show the date and time"
    assert rows[0]["student_finish"] == "stop" and rows[0]["teacher_prompt_tokens"] > rows[0]["student_prompt_tokens"]


def test_reasons_use_generator_with_reason_sampling() -> None:
    gen = FakeEngine(World(SPEC))
    cfg = synth_cfg(reason_temperature=0.65, reason_top_p=0.8, reason_max_tokens=99, reason_sentences=3)
    rows = reasons(SPEC, cfg, gen, [{"id": 0, "input": "Show the uptime of the machine", "student": "no",
                                     "teacher": "Think: x\nAct: bash"}])
    convs, params = gen.calls[0]
    assert (params.temperature, params.top_p, params.max_new_tokens) == (0.65, 0.8, 99)
    text = convs[0][-1]["content"]
    assert "In about 3 sentences" in text and "AS-IS answer" in text and "Think: x\nAct: bash" in text
    assert rows == [{"id": 0, "reason": "The prompt demands Think/Act lines, so for 'Show the uptime of the "
                                        "machine' the answer becomes an action.", "reason_finish": "stop"}]


# ------------------------------------------------------------------ role play

def roleplay_world(spec, behaviours: dict[str, str]):
    """Agent says ``Act: step N``; behaviour per task decides when things end.

    end2: env answers the 2nd action with the end token as a stop string;
    token1: env answers the 1st action with the bare end-token text (no stop string);
    never: env always observes; empty2: the agent's 2nd reply is empty; ctx1: agent's first turn has no room.
    """
    def reply(conv, params):
        how = behaviours[task_of(conv, spec)]
        if kind_of(conv) == "environment":
            n = int(conv[-1]["content"].rsplit(" ", 1)[-1])
            if how == "end2" and n == 2:
                return Generation("", "stop", 5, 1, stop_string=spec.environment.end_token)
            if how == "token1" and n == 1:
                return Generation(f"  {spec.environment.end_token}\n", "stop", 5, 1)
            return f"Output: ok {n}"
        n = agent_turns_so_far(conv, spec) + 1
        if how == "empty2" and n == 2:
            return Generation("", "stop", 5, 0)
        if how == "ctx1":
            return Generation("", "context", 5000, 0)
        return Generation(f"Think: go.\nAct: step {n}", "length" if n == 3 else "stop", 5, 4)
    return reply


def test_role_play_ends_and_batches_turn_by_turn() -> None:
    behaviours = {"task end2": "end2", "task token1": "token1", "task never": "never",
                  "task empty2": "empty2", "task ctx1": "ctx1"}
    target = FakeEngine(roleplay_world(SPEC, behaviours))
    inputs = [{"id": 10 + k, "input": x} for k, x in enumerate(behaviours)]
    cfg = synth_cfg(max_turns=3, agent_max_tokens=55, env_max_tokens=44, seed=2, agent_resamples=0)
    out = role_play(SPEC, cfg, target, inputs)

    assert [r["id"] for r in out] == [10, 11, 12, 13, 14]
    ends = {x["input"]: r["end"] for x, r in zip(inputs, out)}
    assert ends == {"task end2": END_TOKEN, "task token1": END_TOKEN, "task never": MAX_TURNS,
                    "task empty2": EMPTY, "task ctx1": CONTEXT}
    by_task = {x["input"]: r["turns"] for x, r in zip(inputs, out)}
    assert by_task["task end2"] == [
        {"agent": "Think: go.\nAct: step 1", "observation": "Output: ok 1", "agent_finish": "stop"},
        {"agent": "Think: go.\nAct: step 2", "observation": "", "agent_finish": "stop"}]
    assert by_task["task token1"] == [{"agent": "Think: go.\nAct: step 1", "observation": "", "agent_finish": "stop"}]
    # the environment never answers the last allowed turn: nothing would read it
    assert [t["observation"] for t in by_task["task never"]] == ["Output: ok 1", "Output: ok 2", ""]
    assert by_task["task never"][2]["agent_finish"] == "length"
    assert [t["agent"] for t in by_task["task empty2"]] == ["Think: go.\nAct: step 1"]
    assert by_task["task ctx1"] == []

    # batched: per turn one agent call and one environment call with every open conversation
    kinds = [(kind_of(convs[0]), sorted(task_of(c, SPEC) for c in convs)) for convs, _ in target.calls]
    assert kinds == [
        ("agent", sorted(behaviours)),
        ("environment", ["task empty2", "task end2", "task never", "task token1"]),
        ("agent", ["task empty2", "task end2", "task never"]),
        ("environment", ["task end2", "task never"]),
        ("agent", ["task never"]),
    ]
    agent_params, env_params = target.calls[0][1], target.calls[1][1]
    assert agent_params.temperature == 0 and agent_params.max_new_tokens == 55 and agent_params.stop == ()
    assert env_params.temperature == 0 and env_params.max_new_tokens == 44 and env_params.stop == ("<END>",)


def test_role_play_conversations_grow_in_both_personas() -> None:
    target = FakeEngine(roleplay_world(SPEC, {"task never": "never"}))
    role_play(SPEC, synth_cfg(max_turns=3, agent_resamples=0), target, [{"id": 0, "input": "task never"}])
    last_agent, last_env = target.calls[2][0][0], target.calls[3][0][0]
    assert last_agent == SPEC.messages_with_input("task never") + [
        {"role": "assistant", "content": "Think: go.\nAct: step 1"},
        {"role": "user", "content": "Output: ok 1"}]
    assert last_env == environment_conversation(SPEC) + [
        {"role": "user", "content": environment_opening("task never", "Think: go.\nAct: step 1")},
        {"role": "assistant", "content": "Output: ok 1"},
        {"role": "user", "content": "Think: go.\nAct: step 2"}]
    assert all(m["content"] for m in last_env)  # never an empty message to the environment


def test_role_play_uses_prompt_max_turns_capped_by_config() -> None:
    target = FakeEngine(roleplay_world(SPEC, {"t": "never"}))
    out = role_play(SPEC, synth_cfg(max_turns=0, agent_resamples=0), target, [{"id": 0, "input": "t"}])
    assert len(out[0]["turns"]) == SPEC.max_turns == 4 and out[0]["end"] == MAX_TURNS
    assert len(target.calls) == 7  # 4 agent turns, and no environment answer to the last


def test_max_turns_for() -> None:
    spec = mini_spec(max_turns=8)
    assert max_turns_for(spec, synth_cfg(max_turns=0)) == 8
    assert max_turns_for(spec, synth_cfg(max_turns=3)) == 3
    assert max_turns_for(spec, synth_cfg(max_turns=20)) == 8


def test_role_play_empty_part_makes_no_calls() -> None:
    target = FakeEngine(lambda c, p: pytest.fail("no call expected"))
    assert role_play(SPEC, synth_cfg(), target, []) == []


def test_play_episodes_student_view_and_separate_generators() -> None:
    """The evaluate stage's use: an agent without the prompt, and its own generate function."""
    agent = FakeEngine(lambda conv, params: f"Think: go.\nAct: step {(len(conv) + 1) // 2}")
    env = FakeEngine(lambda conv, params: (Generation("", "stop", 5, 1, stop_string="<END>")
                                           if conv[-1]["content"].endswith("step 2") else "Output: ok"))
    views = [[{"role": "user", "content": "task a"}], [{"role": "user", "content": "task b"}]]
    before = [list(v) for v in views]
    agent_params, env_params = SamplingParams(max_new_tokens=9), SamplingParams(max_new_tokens=7, stop=("<END>",))
    out = play_episodes(SPEC, ["task a", "task b"], views, agent.generate, env.generate, 3, agent_params, env_params)
    assert views == before  # the opening conversations are not modified
    assert out == [{"turns": [{"agent": "Think: go.\nAct: step 1", "observation": "Output: ok", "agent_finish": "stop"},
                              {"agent": "Think: go.\nAct: step 2", "observation": "", "agent_finish": "stop"}],
                    "end": END_TOKEN}] * 2
    assert [len(c) for c, _ in agent.calls] == [2, 2] and [len(c) for c, _ in env.calls] == [2, 2]
    assert all(p is agent_params for _, p in agent.calls) and all(p is env_params for _, p in env.calls)
    # the agent never sees the prompt; the environment gets the task with the first action
    assert agent.calls[1][0][0] == [{"role": "user", "content": "task a"},
                                    {"role": "assistant", "content": "Think: go.\nAct: step 1"},
                                    {"role": "user", "content": "Output: ok"}]
    assert env.calls[0][0][1][-1]["content"] == environment_opening("task b", "Think: go.\nAct: step 1")


def test_play_episodes_blank_agent_reply_ends_the_episode() -> None:
    agent = FakeEngine(lambda conv, params: " \n ")
    env = FakeEngine(lambda conv, params: pytest.fail("a blank action must not reach the environment"))
    out = play_episodes(SPEC, ["t"], [[{"role": "user", "content": "t"}]], agent.generate, env.generate, 3,
                        SamplingParams(), SamplingParams())
    assert out == [{"turns": [], "end": EMPTY}]


def test_play_episodes_reuses_given_first_turns_and_can_skip_the_last_observation() -> None:
    agent = FakeEngine(lambda conv, params: f"Think: go.\nAct: step {(len(conv) + 1) // 2}")
    env = FakeEngine(lambda conv, params: "Output: ok")
    first = [Generation("Think: known.\nAct: step 1", "stop", 0, 0)]
    out = play_episodes(SPEC, ["t"], [[{"role": "user", "content": "t"}]], agent.generate, env.generate, 2,
                        SamplingParams(), SamplingParams(), last_observation=False, first_turns=first)
    assert len(agent.calls) == 1 and len(env.calls) == 1  # turn 1 was given; no answer to the last turn
    assert [t["agent"] for t in out[0]["turns"]] == ["Think: known.\nAct: step 1", "Think: go.\nAct: step 2"]
    assert out[0]["turns"][0]["observation"] == "Output: ok" and out[0]["end"] == MAX_TURNS
    assert agent.calls[0][0][0][1] == {"role": "assistant", "content": "Think: known.\nAct: step 1"}


def test_play_episodes_resamples_rejected_agent_turns() -> None:
    """Greedy turns out of format are sampled again, every try in one call; the first accepted
    sample replaces the turn before the environment answers; without one the turn stays. Later
    turns are not resampled (``turns=1``)."""
    samples = {"fixable": ["chat", "Act: cut", "Act: whole"], "hopeless": ["chat"] * 3}
    served: dict[str, int] = {}

    def reply(conv, params):
        task = conv[0]["content"]
        if params.temperature == 0:
            return "Act: fine" if task == "good" and len(conv) == 1 else "chat"
        served[task] = served.get(task, -1) + 1
        return Generation(samples[task][served[task]], "length", 0, 0)

    agent = FakeEngine(reply)
    env = FakeEngine(lambda conv, params: "Output: ok")
    tasks = ["good", "fixable", "hopeless"]
    params = SamplingParams(max_new_tokens=9, temperature=0.8, seed=3)
    out = play_episodes(SPEC, tasks, [[{"role": "user", "content": t}] for t in tasks], agent.generate,
                        env.generate, 2, SamplingParams(), SamplingParams(), last_observation=False,
                        resampling=Resampling(3, params, lambda text: text.startswith("Act:")))
    assert [t["turns"][0]["agent"] for t in out] == ["Act: fine", "Act: cut", "chat"]
    assert [t["turns"][0].get("resampled", False) for t in out] == [False, True, False]
    assert out[1]["turns"][0]["agent_finish"] == "length"
    assert all(t["turns"][1]["agent"] == "chat" and "resampled" not in t["turns"][1] for t in out)
    # turn 1: greedy, then one call with 3 tries of each rejected view; turn 2: greedy only
    assert [len(c) for c, _ in agent.calls] == [3, 6, 3]
    assert agent.calls[1][1] == params
    assert [c[0]["content"] for c in agent.calls[1][0]] == ["fixable"] * 3 + ["hopeless"] * 3
    assert env.calls[0][0][1][-1]["content"] == environment_opening("fixable", "Act: cut")


def test_play_episodes_never_resamples_a_full_context() -> None:
    agent = FakeEngine(lambda conv, params: Generation("", "context", 9, 0))
    out = play_episodes(SPEC, ["t"], [[{"role": "user", "content": "t"}]], agent.generate,
                        FakeEngine(lambda c, p: "x").generate, 2, SamplingParams(), SamplingParams(),
                        resampling=Resampling(4, SamplingParams(temperature=1.0), lambda text: True))
    assert out == [{"turns": [], "end": CONTEXT}] and len(agent.calls) == 1


def test_role_play_takes_the_teacher_output_as_its_first_turn() -> None:
    world = World(SPEC)
    target = FakeEngine(world)
    inputs = [{"id": 0, "input": "Count files in /etc", "teacher": "Think: given.\nAct: finish",
               "teacher_finish": "stop"}]
    [same] = role_play(SPEC, synth_cfg(output_max_tokens=64, agent_max_tokens=64), target, inputs)
    assert same["turns"][0]["agent"] == "Think: given.\nAct: finish"
    [own] = role_play(SPEC, synth_cfg(output_max_tokens=32, agent_max_tokens=64), FakeEngine(world), inputs)
    assert own["turns"][0]["agent"] != "Think: given.\nAct: finish"  # other limit: generated anew


# ------------------------------------------------------------------ parts

def test_run_in_parts_resumes_after_a_crash(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    items = list(range(7))
    seen: list[list[int]] = []
    crash_on = [2]  # the call number that fails; cleared for the rerun

    def produce(part):
        seen.append(list(part))
        if len(seen) in crash_on:
            raise ScriptedFailure("crash in part 2")
        return [{"x": i, "sq": i * i} for i in part]

    with pytest.raises(ScriptedFailure):
        run_in_parts(store, "s/parts", items, 3, produce, "test")
    assert store.list_keys("s/parts") == ["s/parts/part-00000.jsonl"]
    assert store.get_jsonl("s/parts/part-00000.jsonl") == [{"x": i, "sq": i * i} for i in range(3)]

    assert seen == [[0, 1, 2], [3, 4, 5]]
    seen.clear()
    crash_on.clear()
    records = run_in_parts(store, "s/parts", items, 3, produce, "test")
    assert seen == [[3, 4, 5], [6]]  # only the missing parts are produced
    assert records == [{"x": i, "sq": i * i} for i in items]
    assert store.list_keys("s/parts") == [f"s/parts/part-{k:05d}.jsonl" for k in range(3)]

    again = run_in_parts(store, "s/parts", items, 3, lambda part: pytest.fail("all parts are stored"), "test")
    assert again == records


# ------------------------------------------------------------------ synthesize end to end

def test_join_by_id_never_by_position() -> None:
    inputs = [{"id": 0, "input": "a"}, {"id": 1, "input": "b"}]
    outputs = [{"id": 1, "teacher": "B"}, {"id": 0, "teacher": "A"}]  # e.g. from replicas in another order
    assert join_by_id(inputs, outputs) == [{"id": 0, "input": "a", "teacher": "A"},
                                           {"id": 1, "input": "b", "teacher": "B"}]
    with pytest.raises(ValueError, match=r"lack ids \[1\]"):
        join_by_id(inputs, outputs[1:])


def tiny_config(**synth) -> GenPIConfig:
    overrides = {"synth.num_inputs": 6, "synth.min_inputs": 4, "synth.part_size": 4, "synth.max_turns": 3,
                 "synth.inputs_per_request": 3,
                 # the scripted inputs differ in one number: near duplicates by design (tested apart)
                 "synth.near_duplicate_threshold": 0.0, "synth.reason_fraction": 1.0,
                 "models.generator.name": "tiny-random-llama", "models.target.name": "tiny-random-llama"}
    overrides.update({f"synth.{k}": v for k, v in synth.items()})
    return load_config("local", overrides=overrides)


def test_reasons_and_role_play_run_side_by_side(tmp_path: Path) -> None:
    """Reasons (generator) and role play (target) overlap: each waits for the other to have started."""
    import threading

    world, both_started = World(SPEC), threading.Barrier(2, timeout=30)

    def meet_once(kind: str):
        met = []

        def reply(conversation, params):
            if kind_of(conversation) == kind and not met:
                met.append(True)
                both_started.wait()  # raises BrokenBarrierError if the other side never comes
            return world(conversation, params)
        return reply

    generator, target = FakeEngine(meet_once("reason")), FakeEngine(meet_once("environment"))
    prefix = synthesize(SPEC, tiny_config(), generator, target, LocalStore(tmp_path))
    assert LocalStore(tmp_path).is_done(prefix)


def test_synthesize_end_to_end_and_rerun(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    cfg = tiny_config()
    world = World(SPEC)
    generator, target = FakeEngine(world), FakeEngine(world)
    prefix = synthesize(SPEC, cfg, generator, target, store)
    assert prefix == artifacts.synth_prefix(SPEC, cfg)
    for name in ("records.jsonl", "quality.json", "_SUCCESS", "inputs/inputs.jsonl"):
        assert store.exists(f"{prefix}/{name}"), name
    assert not store.exists(f"{prefix}/split.json")  # the split is derived from ids by each stage
    assert store.is_done(prefix) and store.done_info(prefix)["records"] == 6
    assert store.get_json(f"{artifacts.prompt_root(SPEC)}/prompt.json") == SPEC.to_json()

    records = store.get_jsonl(f"{prefix}/records.jsonl")
    assert [r["id"] for r in records] == list(range(6))
    assert [r["input"] for r in records] == [f"Report the size of the folder /data/set{k} in bytes." for k in range(6)]
    r0 = records[0]
    assert r0["student"].startswith("I am a language model")
    assert r0["teacher"].startswith("Think: measure it.") and "reason" in r0 and r0["end"] == END_TOKEN
    assert r0["turns"] == [
        {"agent": "Think: measure it.\nAct: bash\n```bash\ndu -sb /data\n```", "observation": "Output: 4096",
         "agent_finish": "stop"},
        {"agent": "Think: the shell printed it.\nAct: finish", "observation": "", "agent_finish": "stop"}]
    assert all("split" not in r and r["turns_generated"] == 2 for r in records)
    quality = store.get_json(f"{prefix}/quality.json")
    assert quality["records"] == 6 and quality["avg_turns"] == 2.0 and quality["hit_max_turns"] == 0.0
    assert quality["missing_final_action"] == 0.0 and quality["max_turns"] == 3
    assert quality["inputs"]["kept"] == 6
    assert (quality["off_format_turns_removed"], quality["records_cut_by_format_filter"],
            quality["records_without_valid_turns"]) == (0, 0, 0)
    assert quality["agent_turns_in_action_format"] == quality["agent_turns_in_action_format_after_filter"] == 1.0

    # generator: 1 input round + 2 reason parts; target: 2 output parts + 2 role-play parts x (2 turns x 2
    # calls - 1): the agent's first turn is the teacher's single-turn output, not generated again
    assert len(generator.calls) == 3
    assert len(target.calls) == 2 + 2 * 3
    assert [len(c) for c, _ in target.calls[:2]] == [8, 4]  # students + teachers, per part

    idle = FakeEngine(lambda c, p: pytest.fail("a finished synthesis must not generate"))
    assert synthesize(SPEC, cfg, idle, idle, store) == prefix
    assert idle.calls == []


def test_reason_ids_pick_a_share_apart_from_the_split() -> None:
    ids = list(range(100))
    picked = reason_ids(ids, 0.35, seed=0)
    assert len(picked) == 35 and picked == reason_ids(list(reversed(ids)), 0.35, seed=0)
    assert reason_ids(ids, 0.35, seed=1) != picked
    assert reason_ids(ids, 1.0, 0) == set(ids) and reason_ids(ids, 0.0, 0) == set()
    assert len(reason_ids(ids[:3], 0.01, 0)) == 1  # a fraction above 0 explains at least one
    # salted apart from the split: the explained records spread over train, validation and test
    split = assign_splits(ids, 0.1, 0.3, seed=0)
    assert {split[i] for i in picked} == {TRAIN, VAL, TEST}


def test_synthesize_explains_only_reason_fraction(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    cfg = tiny_config(reason_fraction=0.5)
    world = World(SPEC)
    generator = FakeEngine(world)
    prefix = synthesize(SPEC, cfg, generator, FakeEngine(world), store)
    records = store.get_jsonl(f"{prefix}/records.jsonl")
    explained = [r["id"] for r in records if r["reason_finish"] != NO_REASON]
    assert set(explained) == reason_ids(list(range(6)), 0.5, cfg.synth.seed) and len(explained) == 3
    assert all(r["reason"] == "" for r in records if r["id"] not in explained)
    assert all(r["reason"] and r["student"] for r in records if r["id"] in explained)
    assert len(generator.calls[-1][0]) == 3  # one reason request per explained record
    assert store.get_json(f"{prefix}/quality.json")["reasons"] == 3


@pytest.mark.parametrize("filter_on", [True, False])
def test_synthesize_filters_off_format_turns(tmp_path: Path, filter_on: bool) -> None:
    """Odd inputs get a chatty (off-format) second agent turn: bash, chatty, finish."""
    store = LocalStore(tmp_path)
    cfg = tiny_config(filter_off_format=filter_on)
    world = World(SPEC, chatty_turn=lambda task: 2 if task.endswith(("1 in bytes.", "3 in bytes.")) else 0)
    prefix = synthesize(SPEC, cfg, FakeEngine(world), FakeEngine(world), store)
    raw = [c for key in store.list_keys(f"{prefix}/conversations") for c in store.get_jsonl(key)]
    assert [len(c["turns"]) for c in raw] == [2, 3, 2, 3, 2, 2]  # the stored parts keep every turn
    records = store.get_jsonl(f"{prefix}/records.jsonl")
    assert [r["turns_generated"] for r in records] == [2, 3, 2, 3, 2, 2]
    quality = store.get_json(f"{prefix}/quality.json")
    assert quality["agent_turns_in_action_format"] == round(12 / 14, 4)  # before the filter
    if filter_on:
        assert [len(r["turns"]) for r in records] == [2, 1, 2, 1, 2, 2]
        assert records[1]["turns"] == raw[1]["turns"][:1]
        assert (quality["off_format_turns_removed"], quality["records_cut_by_format_filter"]) == (4, 2)
        assert quality["agent_turns_in_action_format_after_filter"] == 1.0
    else:
        assert [r["turns"] for r in records] == [c["turns"] for c in raw]
        assert (quality["off_format_turns_removed"], quality["records_cut_by_format_filter"]) == (0, 0)
        assert quality["agent_turns_in_action_format_after_filter"] == round(12 / 14, 4)
    assert quality["records_without_valid_turns"] == 0


@pytest.mark.parametrize("resamples", [2, 0])
def test_synthesize_resamples_off_format_turns(tmp_path: Path, resamples: int) -> None:
    """A target that follows its prompt only when sampling: resampled first turns replace the
    chatty ones (counted), so the filter keeps every conversation whole; with 0 tries it cuts them."""
    store = LocalStore(tmp_path)
    world = World(SPEC, chatty_turn=lambda task: 1 if task.endswith(("1 in bytes.", "3 in bytes.")) else 0,
                  sampling_fixes_chatty=True)
    prefix = synthesize(SPEC, tiny_config(agent_resamples=resamples), FakeEngine(world), FakeEngine(world), store)
    records = store.get_jsonl(f"{prefix}/records.jsonl")
    quality = store.get_json(f"{prefix}/quality.json")
    if resamples:
        assert [len(r["turns"]) for r in records] == [2] * 6
        assert [any(t.get("resampled") for t in r["turns"]) for r in records] == [False, True, False, True, False, False]
        assert quality["agent_turns_resampled_into_format"] == 2 and quality["off_format_turns_removed"] == 0
    else:
        assert [len(r["turns"]) for r in records] == [2, 0, 2, 0, 2, 2]
        assert quality["agent_turns_resampled_into_format"] == 0 and quality["off_format_turns_removed"] == 4
    assert quality["teacher_action_format"] == round(4 / 6, 4)  # the greedy single-turn outputs are kept


def test_split_config_is_not_part_of_the_synthesis_key() -> None:
    cfg = tiny_config()
    other = dataclasses.replace(cfg, split=dataclasses.replace(cfg.split, val_fraction=0.3, test_fraction=0.05,
                                                               seed=9))
    assert artifacts.synth_hash(other) == artifacts.synth_hash(cfg)
    assert artifacts.run_hash(other) != artifacts.run_hash(cfg)  # an adapter does depend on its training split
    assert artifacts.synth_hash(tiny_config(filter_off_format=False)) != artifacts.synth_hash(cfg)


def test_synthesize_resumes_after_a_crash_in_role_play(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    cfg = tiny_config()
    world = World(SPEC)
    generator = FakeEngine(world)
    # crash on the first environment call of the second role-play part
    env_calls = []

    def fail_on(n, convs, params):
        if kind_of(convs[0]) == "environment":
            env_calls.append(n)
            return len(env_calls) == 3
        return False

    target = FakeEngine(world, fail_on=fail_on)
    with pytest.raises(ScriptedFailure):
        synthesize(SPEC, cfg, generator, target, store)
    prefix = artifacts.synth_prefix(SPEC, cfg)
    assert not store.is_done(prefix)
    assert store.list_keys(f"{prefix}/conversations") == [f"{prefix}/conversations/part-00000.jsonl"]
    inputs_before = store.get_jsonl(f"{prefix}/inputs/inputs.jsonl")

    generator2 = FakeEngine(lambda c, p: pytest.fail("inputs and reasons must be reused"))
    target2 = FakeEngine(World(SPEC))
    synthesize(SPEC, cfg, generator2, target2, store)
    assert generator2.calls == []
    # only the missing role-play part (2 records, 2 turns): agent, env, agent, env; no single-turn outputs
    assert [kind_of(c[0]) for c, _ in target2.calls] == ["environment", "agent", "environment"]
    assert all(len(c) == 2 for c, _ in target2.calls)
    assert {task_of(c, SPEC) for convs, _ in target2.calls for c in convs} == {x["input"] for x in inputs_before[4:]}
    records = store.get_jsonl(f"{prefix}/records.jsonl")
    assert [r["input"] for r in records] == [x["input"] for x in inputs_before]
    assert all(r["end"] == END_TOKEN for r in records)


def test_too_few_inputs_names_the_prompt_file(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    cfg = tiny_config(max_input_rounds=2)
    generator = FakeEngine(lambda c, p: "1. ok\n2. sure\n3. Count the lines of /etc/passwd.")
    with pytest.raises(TooFewInputs, match=r"prompts/mini-shell\.md: the generator wrote only 0 usable unique "
                                           r"inputs in 2 rounds \(need synth\.min_inputs=4\)"):
        synthesize(SPEC, cfg, generator, FakeEngine(lambda c, p: pytest.fail("no target calls")), store)
    assert len(generator.calls) == 2
    assert not store.is_done(artifacts.synth_prefix(SPEC, cfg))


# ------------------------------------------------------------------ format filter, quality report, split

def record(turns: list[str], end: str, teacher: str = "Think: a\nAct: finish", student: str = "plain",
           finishes: tuple[str, str, str] = ("stop", "stop", "stop"), agent_finish: str = "stop") -> dict:
    return {"input": "x" * 10, "student": student, "teacher": teacher, "reason": "r" * 20,
            "student_finish": finishes[0], "teacher_finish": finishes[1], "reason_finish": finishes[2],
            "turns": [{"agent": a, "observation": "o", "agent_finish": agent_finish} for a in turns], "end": end}


BASH = "Think: look\nAct: bash"


def test_format_filter_cuts_before_the_first_off_format_turn() -> None:
    turns = record([BASH, "I looked.", BASH, "Think: ok\nAct: finish"], MAX_TURNS)["turns"]
    assert cut_at_off_format(SPEC, turns) == turns[:1]
    assert cut_at_off_format(SPEC, turns[:1]) == turns[:1]
    assert cut_at_off_format(SPEC, [{"agent": "hello", "observation": "", "agent_finish": "stop"}]) == []
    no_regexes = mini_spec(action_format=dataclasses.replace(SPEC.action_format, actions=()))
    assert cut_at_off_format(no_regexes, turns) == turns
    r = record([BASH, "I looked.", BASH], MAX_TURNS)
    assert filter_record(SPEC, r, True) == {**r, "turns": r["turns"][:1], "turns_generated": 3}
    assert filter_record(SPEC, r, False) == {**r, "turns_generated": 3}
    assert len(r["turns"]) == 3  # the input record is not modified


def test_quality_report_numbers() -> None:
    raw = [
        record([BASH, "Think: ok\nAct: answer(3)"], END_TOKEN),
        record([BASH, BASH, BASH], MAX_TURNS, student="Think: s\nAct: finish", finishes=("length", "stop", "stop")),
        record([BASH, "Think: done\nAct: finish"], END_TOKEN, teacher="no format", agent_finish="length"),
        record(["chatty reply"], EMPTY),
        record([BASH, "I am done.", "Think: done\nAct: finish"], END_TOKEN),
    ]
    records = [filter_record(SPEC, r, True) for r in raw]
    stats = InputStats(requests=3, candidates=9, kept=5, rounds=1)
    q = quality_report(SPEC, records, raw, stats, 3)
    assert q["records"] == 5
    assert q["avg_turns"] == 2.2                 # (2 + 3 + 2 + 1 + 3) / 5, as generated
    assert q["hit_max_turns"] == 0.2
    assert q["abnormal_termination"] == 0.2
    assert q["end_reasons"] == {END_TOKEN: 3, MAX_TURNS: 1, EMPTY: 1}
    assert q["missing_final_action"] == 0.4      # the max-turns and the chatty records
    assert q["teacher_action_format"] == 0.8
    assert q["student_action_format"] == 0.2
    assert q["agent_turns_in_action_format"] == round(9 / 11, 4)  # before the filter
    assert q["agent_turns_in_action_format_after_filter"] == 1.0  # 8 of 8 kept turns
    assert q["off_format_turns_removed"] == 3    # "chatty reply"; "I am done." and the finish after it
    assert q["records_cut_by_format_filter"] == 2 and q["records_without_valid_turns"] == 1
    assert q["avg_turns_after_filter"] == 1.6    # (2 + 3 + 2 + 0 + 1) / 5
    assert q["truncated_outputs"] == {"student": 0.2, "teacher": 0.0, "reason": 0.0, "agent_turns": round(2 / 11, 4)}
    assert q["gold_turns_in_prompt"] == 2 and q["max_turns"] == 3
    assert q["inputs"]["kept"] == 5
    assert q["avg_chars"] == {"input": 10.0, "reason": 20.0}


def test_quality_report_without_action_format_or_records() -> None:
    spec = mini_spec(action_format=dataclasses.replace(SPEC.action_format, actions=(), final=()))
    raw = [record(["a"], END_TOKEN)]
    q = quality_report(spec, [filter_record(spec, r, True) for r in raw], raw, InputStats(), 2)
    assert "missing_final_action" not in q and "teacher_action_format" not in q
    assert "agent_turns_in_action_format_after_filter" not in q and q["off_format_turns_removed"] == 0
    empty = quality_report(SPEC, [], [], InputStats(), 2)
    assert empty["records"] == 0 and empty["avg_turns"] == 0.0 and empty["hit_max_turns"] == 0.0


def test_assign_splits_deterministic_disjoint_complete() -> None:
    ids = list(range(40))
    a = assign_splits(ids, 0.25, 0.1, seed=1)
    assert a == assign_splits(list(reversed(ids)), 0.25, 0.1, seed=1)
    assert sorted(a) == ids and set(a.values()) == {"train", "val", "test"}  # every id in exactly one set
    sets = {name: {i for i, v in a.items() if v == name} for name in ("train", "val", "test")}
    assert [len(sets[n]) for n in ("train", "val", "test")] == [26, 10, 4]
    # the first ids by fingerprint([seed, id]) are test, the next val
    order = sorted(ids, key=lambda i: fingerprint([1, i]))
    assert sets["test"] == set(order[:4]) and sets["val"] == set(order[4:14])
    assert assign_splits(ids, 0.25, 0.1, seed=2) != a  # the seed matters
    assert set(assign_splits(ids, 0.0, 0.0, seed=1).values()) == {"train"}
    assert assign_splits([5], 0.5, 0.5, seed=0) == {5: "train"}  # at least one training record
    assert sorted(assign_splits([3, 4], 0.5, 0.5, seed=0).values()) == ["test", "train"]
    assert sorted(assign_splits([3, 4, 8, 9], 0.5, 0.5, seed=0).values()) == ["test", "test", "train", "val"]
    assert assign_splits([], 0.5, 0.5, seed=0) == {}


# ------------------------------------------------------------------ on the real tiny model

class Recording:
    """Wraps a real engine and counts its generate calls."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def generate(self, conversations, params):
        self.calls.append((len(conversations), params))
        return self.engine.generate(conversations, params)

    def count_tokens(self, conversations):
        return self.engine.count_tokens(conversations)


@pytest.fixture(scope="module")
def tiny_engine():
    from genpi.engines.hf import HFEngine

    return HFEngine("tiny-random-llama", batch_size=4)


@pytest.mark.timeout(120)
def test_outputs_and_role_play_on_the_tiny_model(tiny_engine) -> None:
    target = Recording(tiny_engine)
    cfg = synth_cfg(output_max_tokens=8, agent_max_tokens=8, env_max_tokens=8, max_turns=2, agent_resamples=0)
    inputs = [{"id": 0, "input": "Count the files in /tmp."}, {"id": 1, "input": "Print the kernel version."}]
    outputs = single_turn_outputs(SPEC, cfg, target, inputs)
    assert [o["id"] for o in outputs] == [0, 1] and target.calls[0][0] == 4
    assert all(o["teacher_prompt_tokens"] > o["student_prompt_tokens"] for o in outputs)
    assert all(o["student_finish"] in ("stop", "length") for o in outputs)

    first = role_play(SPEC, cfg, target, inputs)
    again = role_play(SPEC, cfg, target, inputs)
    assert first == again  # greedy: reproducible
    runs = target.calls[1:]
    assert len(runs) % 2 == 0 and runs[:len(runs) // 2] == runs[len(runs) // 2:]
    per_run = runs[:len(runs) // 2]
    assert 1 <= len(per_run) <= 2 * 2  # at most one agent and one environment call per turn
    assert per_run[0][0] == 2 and all(n <= 2 for n, _ in per_run)  # both conversations in one call
    assert [p.stop for _, p in per_run[1::2]] == [("<END>",)] * len(per_run[1::2])
    for r in first:
        assert 0 <= len(r["turns"]) <= 2 and r["end"] in (END_TOKEN, MAX_TURNS, CONTEXT, EMPTY)
        assert all(t["agent"] for t in r["turns"])
        if r["end"] == MAX_TURNS:
            assert len(r["turns"]) == 2
    # the random model never writes the action format: every turn is resampled, reproducibly
    resampling = dataclasses.replace(cfg, agent_resamples=2)
    sampled = role_play(SPEC, resampling, tiny_engine, inputs)
    assert sampled == role_play(SPEC, resampling, tiny_engine, inputs)
