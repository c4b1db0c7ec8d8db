"""Role play and the shared episode loop (turn by turn, resampling, turn limits)."""

from __future__ import annotations

import dataclasses

import pytest

from genpi.config import SynthConfig
from genpi.engines.base import Generation, SamplingParams
from genpi.prompt.episodes import (
    CONTEXT,
    EMPTY,
    END_TOKEN,
    MAX_TURNS,
    Resampling,
    play_episodes,
)
from genpi.prompt.views import environment_conversation, environment_opening
from genpi.synth.roleplay import max_turns_for, role_play
from tests.fakes import (
    FakeEngine,
    World,
    agent_turns_so_far,
    kind_of,
    mini_spec,
    task_of,
)

SPEC = mini_spec()


def synth_cfg(**changes) -> SynthConfig:
    return dataclasses.replace(SynthConfig(), **changes)


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
    behaviours = {
        "task end2": "end2",
        "task token1": "token1",
        "task never": "never",
        "task empty2": "empty2",
        "task ctx1": "ctx1",
    }
    target = FakeEngine(roleplay_world(SPEC, behaviours))
    inputs = [{"id": 10 + k, "input": x} for k, x in enumerate(behaviours)]
    cfg = synth_cfg(max_turns=3, agent_max_tokens=55, env_max_tokens=44, seed=2, agent_resamples=0)
    out = role_play(SPEC, cfg, target, inputs)

    assert [r["id"] for r in out] == [10, 11, 12, 13, 14]
    ends = {x["input"]: r["end"] for x, r in zip(inputs, out)}
    assert ends == {
        "task end2": END_TOKEN,
        "task token1": END_TOKEN,
        "task never": MAX_TURNS,
        "task empty2": EMPTY,
        "task ctx1": CONTEXT,
    }
    by_task = {x["input"]: r["turns"] for x, r in zip(inputs, out)}
    assert by_task["task end2"] == [
        {"agent": "Think: go.\nAct: step 1", "observation": "Output: ok 1", "agent_finish": "stop"},
        {"agent": "Think: go.\nAct: step 2", "observation": "", "agent_finish": "stop"},
    ]
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
        {"role": "user", "content": "Output: ok 1"},
    ]
    assert last_env == environment_conversation(SPEC) + [
        {"role": "user", "content": environment_opening("task never", "Think: go.\nAct: step 1")},
        {"role": "assistant", "content": "Output: ok 1"},
        {"role": "user", "content": "Think: go.\nAct: step 2"},
    ]
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
    env = FakeEngine(
        lambda conv, params: (
            Generation("", "stop", 5, 1, stop_string="<END>")
            if conv[-1]["content"].endswith("step 2")
            else "Output: ok"
        )
    )
    views = [[{"role": "user", "content": "task a"}], [{"role": "user", "content": "task b"}]]
    before = [list(v) for v in views]
    agent_params, env_params = SamplingParams(max_new_tokens=9), SamplingParams(max_new_tokens=7, stop=("<END>",))
    out = play_episodes(SPEC, ["task a", "task b"], views, agent.generate, env.generate, 3, agent_params, env_params)
    assert views == before  # the opening conversations are not modified
    assert (
        out
        == [
            {
                "turns": [
                    {"agent": "Think: go.\nAct: step 1", "observation": "Output: ok", "agent_finish": "stop"},
                    {"agent": "Think: go.\nAct: step 2", "observation": "", "agent_finish": "stop"},
                ],
                "end": END_TOKEN,
            }
        ]
        * 2
    )
    assert [len(c) for c, _ in agent.calls] == [2, 2] and [len(c) for c, _ in env.calls] == [2, 2]
    assert all(p is agent_params for _, p in agent.calls) and all(p is env_params for _, p in env.calls)
    # the agent never sees the prompt; the environment gets the task with the first action
    assert agent.calls[1][0][0] == [
        {"role": "user", "content": "task a"},
        {"role": "assistant", "content": "Think: go.\nAct: step 1"},
        {"role": "user", "content": "Output: ok"},
    ]
    assert env.calls[0][0][1][-1]["content"] == environment_opening("task b", "Think: go.\nAct: step 1")


def test_play_episodes_blank_agent_reply_ends_the_episode() -> None:
    agent = FakeEngine(lambda conv, params: " \n ")
    env = FakeEngine(lambda conv, params: pytest.fail("a blank action must not reach the environment"))
    out = play_episodes(
        SPEC,
        ["t"],
        [[{"role": "user", "content": "t"}]],
        agent.generate,
        env.generate,
        3,
        SamplingParams(),
        SamplingParams(),
    )
    assert out == [{"turns": [], "end": EMPTY}]


def test_play_episodes_reuses_given_first_turns_and_can_skip_the_last_observation() -> None:
    agent = FakeEngine(lambda conv, params: f"Think: go.\nAct: step {(len(conv) + 1) // 2}")
    env = FakeEngine(lambda conv, params: "Output: ok")
    first = [Generation("Think: known.\nAct: step 1", "stop", 0, 0)]
    out = play_episodes(
        SPEC,
        ["t"],
        [[{"role": "user", "content": "t"}]],
        agent.generate,
        env.generate,
        2,
        SamplingParams(),
        SamplingParams(),
        last_observation=False,
        first_turns=first,
    )
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
    out = play_episodes(
        SPEC,
        tasks,
        [[{"role": "user", "content": t}] for t in tasks],
        agent.generate,
        env.generate,
        2,
        SamplingParams(),
        SamplingParams(),
        last_observation=False,
        resampling=Resampling(3, params, lambda text: text.startswith("Act:")),
    )
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
    out = play_episodes(
        SPEC,
        ["t"],
        [[{"role": "user", "content": "t"}]],
        agent.generate,
        FakeEngine(lambda c, p: "x").generate,
        2,
        SamplingParams(),
        SamplingParams(),
        resampling=Resampling(4, SamplingParams(temperature=1.0), lambda text: True),
    )
    assert out == [{"turns": [], "end": CONTEXT}] and len(agent.calls) == 1


def test_role_play_takes_the_teacher_output_as_its_first_turn() -> None:
    world = World(SPEC)
    target = FakeEngine(world)
    inputs = [
        {"id": 0, "input": "Count files in /etc", "teacher": "Think: given.\nAct: finish", "teacher_finish": "stop"}
    ]
    [same] = role_play(SPEC, synth_cfg(output_max_tokens=64, agent_max_tokens=64), target, inputs)
    assert same["turns"][0]["agent"] == "Think: given.\nAct: finish"
    [own] = role_play(SPEC, synth_cfg(output_max_tokens=32, agent_max_tokens=64), FakeEngine(world), inputs)
    assert own["turns"][0]["agent"] != "Think: given.\nAct: finish"  # other limit: generated anew
