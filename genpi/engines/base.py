"""The engine interface every backend implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

Message = dict[str, str]
Conversation = list[Message]


@dataclass(frozen=True)
class SamplingParams:
    """How to decode. ``temperature == 0`` means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()


@dataclass
class Generation:
    """One output text and why it ended.

    ``finish_reason`` is ``stop`` (end of turn or a stop string), ``length`` (hit
    max_new_tokens) or ``context`` (the conversation left no room in the model's context,
    so nothing was generated). ``stop_string`` is the stop string that ended it, if any
    (cut from ``text``).
    """

    text: str
    finish_reason: str
    prompt_tokens: int
    output_tokens: int
    stop_string: str = ""


class Engine(Protocol):
    """Chat conversations in, one generation per conversation out, in order.

    ``adapters[i]``, when given, names the LoRA adapter (a PEFT folder added with
    ``add_adapter``) that serves request i; None serves it with the base model.
    """

    model_name: str
    max_context: int

    def generate(self, conversations: list[Conversation], params: SamplingParams,
                 adapters: list[str | None] | None = None) -> list[Generation]:
        ...

    def add_adapter(self, folder: str) -> str:
        ...

    def count_tokens(self, conversations: list[Conversation]) -> list[int]:
        ...
