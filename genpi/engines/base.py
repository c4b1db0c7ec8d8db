"""The engine interface every backend implements."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from genpi.chat import Conversation, Message
from genpi.errors import ModelError

__all__ = ["Conversation", "Message", "Engine", "Generation", "SamplingParams"]


GREEDY_BELOW = 1e-5  # a lower temperature decodes greedily (as vLLM reads it): logits divided by it overflow


@dataclass(frozen=True)
class SamplingParams:
    """How to decode. ``temperature`` 0 (or below :data:`GREEDY_BELOW`) means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


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


_MIN_ROOM = 8  # new tokens below which a reply cannot say anything useful


def leaves_no_room(prompt_tokens: int, max_context: int) -> bool:
    """True when a conversation this long leaves no room for a reply (finish reason ``context``)."""
    return prompt_tokens + _MIN_ROOM > max_context


def adapter_config(folder: str | Path) -> dict[str, Any]:
    """The ``adapter_config.json`` of a PEFT adapter folder, or a ModelError naming the folder."""
    path = Path(folder) / "adapter_config.json"
    if not path.is_file():
        raise ModelError(
            f"adapter folder {folder} has no adapter_config.json; point at a PEFT adapter "
            f"folder (save_pretrained output)"
        )
    return json.loads(path.read_text())


def request_seeds(seed: int, encoded: list[list[int]]) -> list[int]:
    """A seed per request from the call's seed, the request's tokens and its rank among identical
    requests of the call: a sample then depends on neither the batch it shares nor its position."""
    seen: dict[bytes, int] = {}
    seeds = []
    for ids in encoded:
        digest = hashlib.sha256(str(ids).encode()).digest()
        rank = seen[digest] = seen.get(digest, -1) + 1
        mixed = hashlib.sha256(digest + f"{seed}/{rank}".encode()).digest()
        seeds.append(int.from_bytes(mixed[:4], "little") & 0x7FFFFFFF)
    return seeds


class Engine(Protocol):
    """Chat conversations in, one generation per conversation out, in order.

    ``adapters[i]``, when given, names the LoRA adapter (a PEFT folder added with
    ``add_adapter``) that serves request i; None serves it with the base model.
    """

    model_name: str
    max_context: int

    def generate(
        self, conversations: list[Conversation], params: SamplingParams, adapters: list[str | None] | None = None
    ) -> list[Generation]: ...

    def add_adapter(self, folder: str) -> str: ...

    def count_tokens(self, conversations: list[Conversation]) -> list[int]: ...
