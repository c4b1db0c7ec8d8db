"""Parity probes: the trained adapter's greedy answers, recorded where it is published and
checked where it is served.

An adapter that loads and silently changes nothing (or is mis-scaled) is the commonest multi-LoRA
serving bug. At publish time the evaluate stage records a few fixed probe inputs and the adapter's
greedy answers; a server checks a version before serving it: its answers must equal the recorded
ones and differ from the base model's on at least one probe. Probes are answered one at a time in
float32, where greedy decoding is stable across batch shapes and kernels (bf16 is not).

Where the server checks on an engine whose kernels or dtype differ from the trainer's (the vLLM
replica checks on its own serving engine, where a silent no-op would live), an answer that differs
must differ only at near ties (:func:`near_ties`): walked along the trained answer's tokens, the
engine ranks every trained token it would not pick itself among its top ``TOP_LOGPROBS``, within
``NEAR_TIE_NATS`` of its own choice (0.25: two bf16 steps of a logit between 16 and 32). Measured
on the embedded model (vLLM 0.32 CPU, bf16, the three adapters of a ``make run``, 9 probes): 8
answers equal the recorded ones; one leaves it once, at an exact tie (0.0 nats), and then follows it
to the end. The base model walked along the same 9 trained answers leaves each at its first
departure with the trained token outside its top 5. On the adapters of a later recipe (LoRA on
every layer), vLLM in bf16 split one answer's text otherwise at a near tie (a backtick alone, where
float32 wrote backtick-and-period) and then left it by far; float32 vLLM answered exactly as
trained, and the walk from the other split passes (:func:`near_ties`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from genpi.chat import Conversation
from genpi.engines.base import SamplingParams

PROBE_DTYPE = "float32"
PROBE_COUNT = 3
PROBE_TOKENS = 24
TOP_LOGPROBS = 5
NEAR_TIE_NATS = 0.25
MAX_WALKS = 8  # walks along the trained answer, from the first and from near-tie splits of the text

# greedy(forced, n): the engine's greedy continuation of a probe after the tokens ``forced`` (at most
# n tokens, an end token included), with each token's top log-probabilities
Continuation = Callable[[list[int], int], tuple[list[int], list[dict[int, float]]]]


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
    engine: Any,
    adapter: str,
    probes: list[dict[str, Any]],
    base_replies: dict[str, str] | None = None,
    tie: Callable[[dict[str, Any]], str | None] | None = None,
) -> str | None:
    """None when the served adapter answers every probe as recorded and differs from the base
    model on at least one; otherwise why not (one line). ``base_replies`` keeps the base model's
    answers between checks on one engine (they never change), so a new version of a prompt with
    the same probes costs only its own answers. ``tie(probe)``, when given, may accept an answer
    that differs (None) or say why it does not (:func:`near_ties`)."""
    conversations = [p["messages"] for p in probes]
    max_tokens = int(probes[0].get("max_tokens", PROBE_TOKENS))
    served = answers(engine, conversations, adapter, max_tokens)
    for k, (probe, reply) in enumerate(zip(probes, served)):
        if reply != probe["reply"] and (why := tie(probe) if tie else "") is not None:
            at = next(
                (i for i, (x, y) in enumerate(zip(reply, probe["reply"])) if x != y),
                min(len(reply), len(probe["reply"])),
            )
            cut = max(0, at - 20)  # from a little before where they part
            return (
                f"parity check failed: probe {k} answered {'...' * bool(cut)}{reply[cut : cut + 60]!r}, the trained "
                f"adapter answered {'...' * bool(cut)}{probe['reply'][cut : cut + 60]!r}" + (f" ({why})" if why else "")
            )
    known = {} if base_replies is None else base_replies
    keys = [json.dumps([c, max_tokens], sort_keys=True) for c in conversations]
    missing = [k for k in range(len(keys)) if keys[k] not in known]
    for k, reply in zip(missing, answers(engine, [conversations[k] for k in missing], None, max_tokens)):
        known[keys[k]] = reply
    if served == [known[key] for key in keys]:
        return "parity check failed: the adapter answers every probe as the base model does (it changes nothing)"
    return None


def near_ties(trained: str, greedy: Continuation, decode: Callable[[list[int]], str]) -> str | None:
    """None when the engine leaves the trained answer ``trained`` only at near ties: walked along
    it, wherever its greedy choice does not continue the trained text, its best token that does is
    among its top ``TOP_LOGPROBS`` and at most ``NEAR_TIE_NATS`` below its choice (the walk goes on
    from that token). Otherwise where and by how much not. Compared as text (``decode`` keeps
    special tokens, so an early end of turn is a departure), so tokenizing the trained answer
    another way is no departure. A greedy token that continues the text but splits it otherwise (a
    backtick alone where the trained answer had backtick-and-period as one token) can lead the walk
    astray later: where a walk fails, the walks from such near-tie splits before it are tried too
    (``MAX_WALKS`` in all); the first walk's failure is the one reported."""

    def follows(ids: list[int]) -> bool:
        text = decode(ids).strip().rstrip("\ufffd")  # a character's first bytes follow if it does
        return trained.startswith(text) or text.startswith(trained)

    def walk(forced: list[int]) -> tuple[str | None, list[list[int]]]:
        """Why the walk from ``forced`` fails (None: it passes), and the near-tie splits it passed."""
        splits: list[list[int]] = []
        for _ in range(4 * PROBE_TOKENS):
            if decode(forced).strip().startswith(trained):
                return None, splits
            got, tops = greedy(forced, PROBE_TOKENS)
            if not got:
                return "the engine gave no tokens", splits
            at = next((i for i in range(len(got)) if not follows(forced + got[: i + 1])), len(got))
            for i in range(at):  # other tokens that continue the text as closely: a near tie, split otherwise
                best = tops[i].get(got[i], max(tops[i].values()))
                splits += [
                    forced + got[:i] + [t]
                    for t, lp in tops[i].items()
                    if t != got[i] and best - lp <= NEAR_TIE_NATS and follows([*forced, *got[:i], t])
                ]
            forced = forced + got[:at]
            if at == len(got):
                continue
            top = tops[at]
            fits = {t: lp for t, lp in top.items() if follows([*forced, t])}
            gap = max(top.values()) - max(fits.values()) if fits else math.inf
            if gap > NEAR_TIE_NATS:
                below = f"{gap:.2f} nats below" if fits else f"outside the top {TOP_LOGPROBS} next to"
                return (
                    f"after {decode(forced).strip()[-40:]!r} the trained answer's next token is {below} the served "
                    f"{decode([got[at]])!r}; near ties up to {NEAR_TIE_NATS} nats are allowed"
                ), splits
            chosen = max(fits, key=fits.__getitem__)
            best = max(top.values())
            splits += [forced + [t] for t, lp in fits.items() if t != chosen and best - lp <= NEAR_TIE_NATS]
            forced = forced + [chosen]
        return "the walk along the trained answer did not end", splits

    starts: list[list[int]] = [[]]
    first: str | None = None
    for _ in range(MAX_WALKS):
        if not starts:
            break
        why, splits = walk(starts.pop())
        if why is None:
            return None
        first = first or why
        starts += splits  # the split nearest the failure is walked first
    return first
