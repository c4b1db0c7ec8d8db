"""The shared conversation views: teacher, student, environment persona, Prompt Generation."""

from __future__ import annotations

import dataclasses
import re

import pytest

from genpi.engines.base import SamplingParams
from genpi.prompt.episodes import play_episodes
from genpi.prompt.files import load_prompts
from genpi.prompt.spec import ActionFormat, PromptSpec, Turn
from genpi.prompt.views import (
    environment_conversation,
    environment_opening,
    environment_system,
    example_episodes,
    prompt_generation_input,
    prompt_generation_target,
    student_messages,
    teacher_messages,
)
from tests.fakes import FakeEngine, mini_spec
from tests.repo import ROOT

SPEC = mini_spec()
SHIPPED = load_prompts(ROOT / "prompts")
OPENING = re.compile(r"A new episode starts\. The agent's task: (?P<task>.+?)\n\n(?P<action>.+)", re.DOTALL)


def two_episode_spec(**changes) -> PromptSpec:
    """system, task 1 (bash, output, answer), task 2 (bash, output, finish), task 3 (no example)."""
    turns = (
        Turn("system", "You are a shell agent. Reply with Think: and then one Act: line."),
        Turn("user", "Task: how many files are in /etc?"),
        Turn("assistant", "Think: count them.\nAct: bash\n```bash\nls /etc | wc -l\n```"),
        Turn("user", "Output: 42"),
        Turn("assistant", "Think: the shell said 42.\nAct: answer(42)"),
        Turn("user", "Task: create the folder /srv/x."),
        Turn("assistant", "Think: make it.\nAct: bash\n```bash\nmkdir -p /srv/x\n```"),
        Turn("user", "Output: (no output)"),
        Turn("assistant", "Think: done.\nAct: finish"),
        Turn("user", "Task: now the real one."),
    )
    return mini_spec(**{"turns": turns, **changes})


# ------------------------------------------------------------------ teacher and student


def test_teacher_messages_append_the_input_to_the_last_user_turn() -> None:
    messages = teacher_messages(SPEC, "Count the users.")
    assert messages[:-1] == [{"role": t.role, "content": t.content} for t in SPEC.turns[:-1]]
    assert messages[-1] == {"role": "user", "content": SPEC.turns[-1].content + "\n\nCount the users."}
    ends_with_assistant = mini_spec(turns=SPEC.turns[:5])
    assert teacher_messages(ends_with_assistant, "Go.")[-1] == {"role": "user", "content": "Go."}


def test_student_messages_drop_prompt_and_trailing_observation() -> None:
    turns = [{"agent": "a1", "observation": "o1"}, {"agent": "a2", "observation": "o2"}]
    assert student_messages("do x", turns) == [
        {"role": "user", "content": "do x"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "o1"},
        {"role": "assistant", "content": "a2"},
    ]
    assert student_messages("do x") == [{"role": "user", "content": "do x"}]


# ------------------------------------------------------------------ Prompt Generation


@pytest.mark.parametrize("spec", [SPEC, two_episode_spec(), *SHIPPED], ids=lambda s: s.name)
def test_pg_target_holds_every_turn_the_teacher_saw_verbatim_in_order(spec: PromptSpec) -> None:
    target = prompt_generation_target(spec, "Because the prompt asks for actions.")
    position = 0
    for message in teacher_messages(spec, ""):
        found = target.find(message["content"], position)
        assert found >= 0, message["content"][:60]
        position = found + len(message["content"])
    assert target.endswith("\n### Why the answer changes\nBecause the prompt asks for actions.")


def test_pg_target_excludes_the_input_and_pg_input_shows_both_answers() -> None:
    target = prompt_generation_target(SPEC, "r.")
    assert "Count the users." not in target and target.startswith(SPEC.turns[0].content)
    shown = prompt_generation_input("Count the users.", "I cannot.", "Think: x\nAct: bash")
    assert shown.index("Count the users.") < shown.index("I cannot.") < shown.index("Think: x\nAct: bash")


# ------------------------------------------------------------------ environment persona


def instructions_block(system: str) -> str:
    return re.search(r"The agent was given these instructions:\n<<<\n(.*)\n>>>", system, re.DOTALL).group(1)


def test_environment_system_takes_the_system_turn_not_the_example_task() -> None:
    block = instructions_block(environment_system(SPEC))
    assert block == SPEC.turns[0].content
    assert SPEC.turns[1].content not in environment_system(SPEC)  # the first user turn is an example task


def test_environment_system_takes_the_first_user_turn_without_a_system_turn() -> None:
    instructions = "You are a shell agent. Reply with Think: and Act:.\n\nTask: how many files are in /etc?"
    spec = mini_spec(turns=(Turn("user", instructions),) + SPEC.turns[2:])
    assert instructions_block(environment_system(spec)) == instructions
    assert "Output: 42" not in environment_system(spec)


def test_example_episodes_split_at_final_actions() -> None:
    spec = two_episode_spec()
    t = spec.turns
    assert example_episodes(spec) == [
        (t[1].content, [(t[2].content, "Output: 42"), (t[4].content, "")]),
        (t[5].content, [(t[6].content, "Output: (no output)"), (t[8].content, "")]),
    ]
    one = two_episode_spec(action_format=ActionFormat(actions=SPEC.action_format.actions))  # no final regexes
    assert example_episodes(one) == [
        (
            t[1].content,
            [
                (t[2].content, "Output: 42"),
                (t[4].content, t[5].content),
                (t[6].content, "Output: (no output)"),
                (t[8].content, ""),
            ],
        )
    ]


def test_environment_conversation_swaps_roles_and_opens_each_episode() -> None:
    spec = two_episode_spec()
    t = spec.turns
    conv = environment_conversation(spec)
    assert conv[0] == {"role": "system", "content": environment_system(spec)}
    assert conv[1:] == [
        {"role": "user", "content": environment_opening(t[1].content, t[2].content)},
        {"role": "assistant", "content": "Output: 42"},
        {"role": "user", "content": t[4].content},  # the final answer ...
        {"role": "assistant", "content": "<END>"},  # ... is answered with the end token
        {"role": "user", "content": environment_opening(t[5].content, t[6].content)},
        {"role": "assistant", "content": "Output: (no output)"},
        {"role": "user", "content": t[8].content},
        {"role": "assistant", "content": "<END>"},
    ]
    assert "<END>" in conv[0]["content"] and spec.environment.description in conv[0]["content"]


def test_environment_conversation_last_agent_turn_without_observation() -> None:
    spec = mini_spec(
        turns=SPEC.turns[:5],
        environment=dataclasses.replace(SPEC.environment, end_token="[[DONE]]"),
        action_format=dataclasses.replace(SPEC.action_format, final=()),
    )
    conv = environment_conversation(spec)
    assert conv[-1] == {"role": "assistant", "content": "[[DONE]]"}
    assert conv[2] == {"role": "assistant", "content": "Output: 42"}


def test_example_and_live_first_turns_share_one_format() -> None:
    spec = two_episode_spec()
    agent = FakeEngine(lambda conv, params: "Think: look.\nAct: bash\n```bash\nls\n```")
    env = FakeEngine(lambda conv, params: "Output: a b")
    play_episodes(
        spec,
        ["Task: list /srv."],
        [teacher_messages(spec, "Task: list /srv.")],
        agent.generate,
        env.generate,
        1,
        SamplingParams(),
        SamplingParams(),
    )
    live = env.calls[0][0][0][-1]["content"]
    persona = environment_conversation(spec)
    firsts = [m["content"] for m in persona if m["role"] == "user" and "A new episode starts" in m["content"]]
    assert len(firsts) == len(example_episodes(spec)) == 2
    shapes = set()
    for text, (task, action) in zip(
        firsts + [live],
        [(e[0], e[1][0][0]) for e in example_episodes(spec)]
        + [("Task: list /srv.", "Think: look.\nAct: bash\n```bash\nls\n```")],
    ):
        match = OPENING.fullmatch(text)
        assert match and (match["task"], match["action"]) == (task, action)
        shapes.add(text.replace(task, "{task}").replace(action, "{action}"))
    assert shapes == {"A new episode starts. The agent's task: {task}\n\n{action}"}


@pytest.mark.parametrize("spec", SHIPPED, ids=lambda s: s.name)
def test_environment_conversation_on_shipped_prompts(spec: PromptSpec) -> None:
    conv = environment_conversation(spec)
    actions = [(e[0], a) for e in example_episodes(spec) for a, _ in e[1]]
    said = [m["content"] for m in conv if m["role"] == "user"]
    replies = [m["content"] for m in conv if m["role"] == "assistant"]
    assert len(said) == len(replies) == spec.gold_turns() == len(actions)
    assert all(text.endswith(action) for text, (_, action) in zip(said, actions))
    assert sum(OPENING.fullmatch(text) is not None for text in said) == len(example_episodes(spec)) >= 1
    # every final action is answered with the end token, every other with an observation
    fmt = spec.action_format
    assert [r == spec.environment.end_token for r in replies] == [fmt.is_final(a) for _, a in actions]
    assert replies[-1] == spec.environment.end_token
    assert all(m["content"].strip() for m in conv)
