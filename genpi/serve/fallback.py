"""Prompt mode: a prompt without a served adapter answers as the base model reading the prompt.

The client's messages follow the prompt's turns as the teacher view lays them out (the first user
message joins the prompt's last user turn), so the tokens every conversation of a prompt opens
with are one fixed prefix: a replica computes its KV once (:meth:`HFEngine.keep_prefix`) and
every request prefills only what follows it.
"""

from __future__ import annotations

from typing import Any

from genpi.chat import Conversation, common_prefix, request_ids
from genpi.prompt.spec import PromptSpec
from genpi.prompt.views import student_messages, teacher_messages


def prompt_conversation(spec: PromptSpec, messages: Conversation) -> Conversation:
    """The prompt's turns, then the client's messages."""
    if messages and messages[0]["role"] == "user":
        return teacher_messages(spec, messages[0]["content"]) + list(messages[1:])
    return [{"role": t.role, "content": t.content} for t in spec.turns] + list(messages)


def prefix_ids(tokenizer: Any, spec: PromptSpec) -> list[int]:
    """The token ids every prompt-mode conversation of ``spec`` opens with."""
    # Inputs of different openings: the boundary token may merge with what follows it.
    rendered = [request_ids(tokenizer, teacher_messages(spec, x)) for x in ("A", "z", "1", " (", "\n-", "Ä")]
    return rendered[0][: common_prefix(rendered)]


def prompt_tokens(tokenizer: Any, spec: PromptSpec) -> int:
    """Tokens the prompt adds to a request: what an adapter saves the client sending and the model reading."""
    return len(request_ids(tokenizer, teacher_messages(spec, "x"))) - len(request_ids(tokenizer, student_messages("x")))
