"""The prompt genpi internalizes: its turns, environment persona and action format (``PromptSpec``).

``prompt_hash`` is the prompt's content address; :mod:`genpi.prompt.files` builds specs from files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from genpi.errors import PromptError
from genpi.fingerprint import fingerprint
from genpi.prompt import patterns

ROLES = ("system", "user", "assistant")
DEFAULT_MAX_TURNS = 5
MAX_TURNS_RANGE = (1, 50)
DEFAULT_ENV_DESCRIPTION = (
    "The environment the agent acts in. It receives each action of the agent and answers "
    "with what that action produces (an observation, a result or a page), in exactly the "
    "style of the worked examples."
)
DEFAULT_END_CONDITION = "the agent has given its final answer or action"
DEFAULT_END_TOKEN = "<END>"


@dataclass(frozen=True)
class Turn:
    """One chat turn of a prompt: ``role`` is system, user or assistant."""

    role: str
    content: str


@dataclass(frozen=True)
class EnvironmentSpec:
    """What the environment persona plays in Self Role-Playing, and when it ends an episode."""

    description: str = DEFAULT_ENV_DESCRIPTION
    end_condition: str = DEFAULT_END_CONDITION
    end_token: str = DEFAULT_END_TOKEN


@dataclass(frozen=True)
class ActionFormat:
    """Regexes for well-formed agent turns (``actions``) and valid final actions (``final``).

    Patterns are searched with ``MULTILINE``, in bounded time (:mod:`genpi.prompt.patterns`). With no patterns
    both checks return False: callers check :attr:`has_actions` / :attr:`has_final` first.
    """

    actions: tuple[str, ...] = ()
    final: tuple[str, ...] = ()

    @property
    def has_actions(self) -> bool:
        return bool(self.actions)

    @property
    def has_final(self) -> bool:
        return bool(self.final)

    def is_action(self, text: str) -> bool:
        """True if any ``actions`` regex matches ``text``."""
        return any(patterns.search(p, text) for p in self.actions)

    def is_final(self, text: str) -> bool:
        """True if any ``final`` regex matches ``text``."""
        return any(patterns.search(p, text) for p in self.final)


@dataclass(frozen=True)
class PromptSpec:
    """A validated prompt and its settings.

    ``prompt_hash`` is the fingerprint of everything but ``source``; leave it empty when
    constructing by hand and it is computed.
    """

    name: str
    source: str
    turns: tuple[Turn, ...]
    max_turns: int = DEFAULT_MAX_TURNS
    environment: EnvironmentSpec = field(default_factory=EnvironmentSpec)
    example_inputs: tuple[str, ...] = ()
    action_format: ActionFormat = field(default_factory=ActionFormat)
    prompt_hash: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "turns", tuple(self.turns))
        object.__setattr__(self, "example_inputs", tuple(self.example_inputs))
        if not self.prompt_hash:
            object.__setattr__(self, "prompt_hash", fingerprint(self._hashed_fields()))

    def _hashed_fields(self) -> dict[str, Any]:
        d = self.to_json()
        del d["source"], d["prompt_hash"]
        return d

    @property
    def id(self) -> str:
        """Stable id used in artifact names: ``name-<first 8 hash chars>``."""
        return f"{self.name}-{self.prompt_hash[:8]}"

    def text(self) -> str:
        """The whole prompt as one string (the PG loss target and the generator's view)."""
        parts = []
        for t in self.turns:
            parts.append(t.content if t.role == "system" else f"### {t.role.title()}\n{t.content}")
        return "\n\n".join(parts)

    def messages_with_input(self, user_input: str) -> list[dict[str, str]]:
        """The teacher's conversation: the prompt's turns plus ``user_input``.

        The input is appended to the last turn (after a blank line) when that is a user
        turn, else it becomes a new user turn.
        """
        messages = [{"role": t.role, "content": t.content} for t in self.turns]
        if messages and messages[-1]["role"] == "user":
            messages[-1]["content"] += "\n\n" + user_input
        else:
            messages.append({"role": "user", "content": user_input})
        return messages

    def example_exchanges(self) -> list[tuple[str, str]]:
        """(agent turn, following user turn or "") for every assistant turn of the prompt.

        Note the user turn after an episode's final action is the next task's introduction,
        not an observation; role-play code should treat final actions specially.
        """
        out = []
        for i, t in enumerate(self.turns):
            if t.role == "assistant":
                nxt = self.turns[i + 1].content if i + 1 < len(self.turns) else ""
                out.append((t.content, nxt))
        return out

    def gold_turns(self) -> int:
        """Number of assistant turns in the prompt's worked examples."""
        return sum(t.role == "assistant" for t in self.turns)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict; :meth:`from_json` inverts it exactly."""
        d = dataclasses.asdict(self)  # nested dataclasses become dicts; tuples stay tuples
        d["turns"] = list(d["turns"])
        d["example_inputs"] = list(d["example_inputs"])
        d["action_format"] = {k: list(v) for k, v in d["action_format"].items()}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PromptSpec:
        """Rebuild a spec written by :meth:`to_json` (the stored hash is kept)."""
        return cls(
            name=d["name"],
            source=d["source"],
            turns=tuple(Turn(t["role"], t["content"]) for t in d["turns"]),
            max_turns=d["max_turns"],
            environment=EnvironmentSpec(**d["environment"]),
            example_inputs=tuple(d["example_inputs"]),
            action_format=ActionFormat(
                actions=tuple(d["action_format"]["actions"]),
                final=tuple(d["action_format"]["final"]),
            ),
            prompt_hash=d["prompt_hash"],
        )


def check_prompt_lengths(
    specs: Iterable[PromptSpec],
    count_tokens: Callable[[list[dict[str, str]]], int],
    max_tokens: int,
    model_name: str,
) -> None:
    """Raise PromptError for every prompt whose messages (input "") exceed ``max_tokens``."""
    too_long = []
    for s in specs:
        n = count_tokens(s.messages_with_input(""))
        if n > max_tokens:
            too_long.append(
                f"{s.source} is {n:,} tokens; the target model {model_name} allows {max_tokens:,} "
                "tokens for the prompt: shorten the prompt or use a model with a longer context"
            )
    if too_long:
        raise PromptError("\n".join(too_long))
