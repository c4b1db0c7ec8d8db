"""Parity probes: the trained adapter's greedy answers, recorded where it is published and
checked where it is served.

An adapter that loads and silently changes nothing (or is mis-scaled) is the commonest multi-LoRA
serving bug. At publish time the evaluate stage records a few fixed probe inputs and the adapter's
greedy answers; a server checks a version before serving it: its answers must equal the recorded
ones and differ from the base model's on at least one probe. Probes are answered one at a time in
float32, where greedy decoding is stable across batch shapes and kernels (bf16 is not).
"""

from __future__ import annotations

import json
from typing import Any

from genpi.chat import Conversation
from genpi.engines.base import SamplingParams

PROBE_DTYPE = "float32"
PROBE_COUNT = 3
PROBE_TOKENS = 24


def probe_conversations(inputs: list[str]) -> list[Conversation]:
    """The probes: the first inputs, each alone (the student view, as clients send them)."""
    return [[{"role": "user", "content": x}] for x in inputs[:PROBE_COUNT]]


def answers(engine: Any, conversations: list[Conversation], adapter: str | None, max_tokens: int) -> list[str]:
    """Greedy answers, one conversation per call (no batch shape to change a float)."""
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0)
    return [engine.generate([c], params, [adapter])[0].text for c in conversations]


def record(engine: Any, adapter: str, inputs: list[str]) -> list[dict[str, Any]]:
    """Probe records for a manifest: messages, the adapter's answer, and how it was decoded."""
    conversations = probe_conversations(inputs)
    replies = answers(engine, conversations, adapter, PROBE_TOKENS)
    return [
        {"messages": c, "reply": r, "max_tokens": PROBE_TOKENS, "dtype": PROBE_DTYPE}
        for c, r in zip(conversations, replies)
    ]


def verdict(
    engine: Any, adapter: str, probes: list[dict[str, Any]], base_replies: dict[str, str] | None = None
) -> str | None:
    """None when the served adapter answers every probe as recorded and differs from the base
    model on at least one; otherwise why not (one line). ``base_replies`` keeps the base model's
    answers between checks on one engine (they never change), so a new version of a prompt with
    the same probes costs only its own answers."""
    conversations = [p["messages"] for p in probes]
    max_tokens = int(probes[0].get("max_tokens", PROBE_TOKENS))
    served = answers(engine, conversations, adapter, max_tokens)
    for k, (probe, reply) in enumerate(zip(probes, served)):
        if reply != probe["reply"]:
            return (
                f"parity check failed: probe {k} answered {reply[:60]!r}, the trained adapter answered "
                f"{probe['reply'][:60]!r}"
            )
    known = {} if base_replies is None else base_replies
    keys = [json.dumps([c, max_tokens], sort_keys=True) for c in conversations]
    missing = [k for k in range(len(keys)) if keys[k] not in known]
    for k, reply in zip(missing, answers(engine, [conversations[k] for k in missing], None, max_tokens)):
        known[keys[k]] = reply
    if served == [known[key] for key in keys]:
        return "parity check failed: the adapter answers every probe as the base model does (it changes nothing)"
    return None
