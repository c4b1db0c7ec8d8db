"""Test doubles shared by the synthesis and training tests: a scripted engine that records
every call, a small hand-made agent prompt, and a scripted "world" that answers every kind of
request GenPI sends (inputs, reasons, agent turns, environment turns) deterministically."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable

from genpi.engines.base import Conversation, Generation, SamplingParams
from genpi.prompt.spec import ActionFormat, EnvironmentSpec, PromptSpec, Turn

Reply = Callable[[Conversation, SamplingParams], "str | Generation"]


class ScriptedFailure(RuntimeError):
    """Raised by a FakeEngine when its ``fail_on`` hook says so (a simulated crash)."""


class FakeEngine:
    """``generate`` answers each conversation with ``reply(conversation, params)``.

    Every call is recorded as ``(deep copy of the conversations, params)`` in :attr:`calls`,
    so tests can check what was asked, with which sampling settings and how often.
    ``fail_on(call_number, conversations, params)`` returning True raises ScriptedFailure
    (the call is still recorded).
    """

    model_name = "fake"
    max_context = 4096

    def __init__(self, reply: Reply, fail_on: Callable[[int, list[Conversation], SamplingParams], bool] | None = None):
        self.reply = reply
        self.fail_on = fail_on
        self.calls: list[tuple[list[Conversation], SamplingParams]] = []

    def generate(self, conversations: list[Conversation], params: SamplingParams) -> list[Generation]:
        self.calls.append((copy.deepcopy(conversations), params))
        if self.fail_on and self.fail_on(len(self.calls), conversations, params):
            raise ScriptedFailure(f"scripted failure on call {len(self.calls)}")
        out = []
        for conversation in conversations:
            r = self.reply(conversation, params)
            if isinstance(r, str):
                r = Generation(r, "stop", self.count_tokens([conversation])[0], len(r.split()))
            out.append(r)
        return out

    def count_tokens(self, conversations: list[Conversation]) -> list[int]:
        return [sum(len(m["content"].split()) + 2 for m in c) for c in conversations]

    @property
    def conversations_sent(self) -> int:
        return sum(len(convs) for convs, _ in self.calls)


# ------------------------------------------------------------------ a small agent prompt

FINAL = (r"^Act: answer\(.+\)[ \t]*$", r"^Act: finish[ \t]*$")
ACTIONS = (r"^Think: [\s\S]+?^Act: (bash|answer\(.+\)|finish)",)


def mini_spec(**changes) -> PromptSpec:
    """A two-example shell-agent prompt: system, task, bash action, output, final answer, next task."""
    fields = dict(
        name="mini-shell",
        source="prompts/mini-shell.md",
        turns=(
            Turn(
                "system",
                "You are a shell agent. Reply with Think: and then Act: bash, Act: answer(...) or Act: finish.",
            ),
            Turn("user", "Task: how many files are in /etc?"),
            Turn("assistant", "Think: count them.\nAct: bash\n```bash\nls /etc | wc -l\n```"),
            Turn("user", "Output: 42"),
            Turn("assistant", "Think: the shell said 42.\nAct: answer(42)"),
            Turn("user", "Task: make a folder /srv/x and tell me when it is done."),
        ),
        max_turns=4,
        environment=EnvironmentSpec(
            description="A Linux shell that runs the agent's bash block.",
            end_condition="the agent answered or finished",
            end_token="<END>",
        ),
        example_inputs=(
            "Count the lines of /etc/passwd.",
            "Create the user deploy with home /home/deploy.",
            "Show the free disk space on the root filesystem.",
        ),
        action_format=ActionFormat(actions=ACTIONS, final=FINAL),
    )
    fields.update(changes)
    return PromptSpec(**fields)


# ------------------------------------------------------------------ classifying requests


def kind_of(conversation: Conversation) -> str:
    """Which GenPI request a conversation is: inputs, reason, environment, student or agent."""
    first = conversation[0]
    if first["role"] == "system":
        if first["content"].startswith("You invent realistic requests"):
            return "inputs"
        if first["content"].startswith("You explain how an application's prompt"):
            return "reason"
        if first["content"].startswith("You are not an assistant"):
            return "environment"
        return "agent"
    if len(conversation) == 1:
        return "student"
    return "agent"


def requested_count(conversation: Conversation) -> int:
    """New items an input request asks for: the list's length less the examples prefilled."""
    total = int(re.search(r"Write a numbered list of (\d+) requests", conversation[1]["content"]).group(1))
    return total - (int(re.search(r"(\d+)\.$", conversation[-1]["content"]).group(1)) - 1)


def task_of(conversation: Conversation, spec: PromptSpec) -> str:
    """The pseudo input a role-play conversation (agent or environment) is about."""
    if kind_of(conversation) == "environment":
        openings = [m["content"] for m in conversation if m["role"] == "user" and "The agent's task: " in m["content"]]
        return re.search(r"The agent's task: (.*)\n", openings[-1]).group(1)
    n_prompt = len(spec.messages_with_input(""))
    return conversation[n_prompt - 1]["content"].rsplit("\n\n", 1)[-1]


def agent_turns_so_far(conversation: Conversation, spec: PromptSpec) -> int:
    return (len(conversation) - len(spec.messages_with_input(""))) // 2


class World:
    """Scripted generator + target for end-to-end synthesis.

    - input requests: the prefilled list continued with the requested count of fresh, unique tasks;
    - reasons: a fixed explanation naming the task;
    - student: a plain-prose reply; agent/teacher: a bash action first, ``Act: finish`` after;
      on agent turn ``chatty_turn(task)`` (1-based; 0 never) a chatty reply out of the action format
      (only when decoding greedily if ``sampling_fixes_chatty``);
    - environment: ``Output: ...`` for a bash action, the end token (as a stop string) after finish.
    """

    CHATTY = "Sure! I measured the folder for you."

    def __init__(
        self, spec: PromptSpec, chatty_turn: Callable[[str], int] = lambda task: 0, sampling_fixes_chatty: bool = False
    ):
        self.spec = spec
        self.chatty_turn = chatty_turn
        self.sampling_fixes_chatty = sampling_fixes_chatty
        self.next_task = 0

    def __call__(self, conversation: Conversation, params: SamplingParams) -> str | Generation:
        kind = kind_of(conversation)
        if kind == "inputs":
            tasks = []
            for _ in range(requested_count(conversation)):
                tasks.append(f"Report the size of the folder /data/set{self.next_task} in bytes.")
                self.next_task += 1
            # the list goes on from the number the prefilled answer already wrote
            return " " + "\n".join(f"{k + 9}. {t}" if k else t for k, t in enumerate(tasks))
        if kind == "reason":
            task = re.search(r"User input:\n(.*)\n", conversation[-1]["content"]).group(1)
            return f"The prompt demands Think/Act lines, so for '{task}' the answer becomes an action."
        if kind == "student":
            return "I am a language model and cannot run commands on your computer."
        if kind == "environment":
            if "Act: finish" in conversation[-1]["content"]:
                return Generation("", "stop", 10, 1, stop_string=self.spec.environment.end_token)
            return "Output: 4096"
        turn = agent_turns_so_far(conversation, self.spec) + 1
        if turn == self.chatty_turn(task_of(conversation, self.spec)):
            if not (self.sampling_fixes_chatty and params.temperature > 0):
                return self.CHATTY
        if turn == 1:
            return "Think: measure it.\nAct: bash\n```bash\ndu -sb /data\n```"
        return "Think: the shell printed it.\nAct: finish"
