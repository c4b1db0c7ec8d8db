"""Text metrics of one agent turn, checked against a prompt's :class:`~genpi.prompt.files.ActionFormat`.

Every function here is pure. Patterns are searched with ``MULTILINE`` in bounded time, as
:meth:`ActionFormat.is_action` does (:mod:`genpi.prompt.patterns`).

**Action text.** An agent reply is free-text reasoning followed by an action (``Think: … /
Act: …``, ``Thought: … / Action: …``, ``THOUGHT: … / ACTION: …``). The reasoning is what the action
regex's *first lazy wildcard* (``[\\s\\S]+?``, ``[\\s\\S]*?``, ``.+?`` or ``.*?``) matches, or a greedy
``.+`` or ``.*`` right before ``\\n`` (it stops at the same line end as its lazy form); the
action is everything the regex matches after it. When that wildcard sits inside a group, or the
pattern has a top-level ``|`` or a numbered backreference (whose numbers a new group would shift),
or it has no such wildcard, the whole match is the action. The
action then runs on to the end of the line its match ends on, so a pattern that checks only the
start of an action (``^REPLY: \\S``) still yields the whole action line. Whitespace is folded.
"""

from __future__ import annotations

import functools
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TypedDict, TypeVar

from genpi.prompt import patterns
from genpi.prompt.spec import ActionFormat

LAZY_WILDCARDS = (r"[\s\S]+?", r"[\s\S]*?", ".+?", ".*?")
# Greedy one-line wildcards are reasoning when a line break follows (escaped, or a newline
# character as JSON decodes "\n"): without DOTALL they stop where their lazy forms stop.
GREEDY_LINE_WILDCARDS = (".+", ".*")
_LINE_BREAKS = (r"\n", "\n")
_DOTALL = re.compile(r"\(\?[a-zA-Z]*s")
_ACTION_GROUP = "genpi_action"
_TOKEN = re.compile(r"\w+|[^\w\s]")
T = TypeVar("T")


class Figure(TypedDict, total=False):
    """An aggregated score: ``value`` is None when nothing was measured (``n == 0``); a rate
    carries its 95% interval."""

    value: float | None
    n: int
    interval: tuple[float, float]


# ---------------------------------------------------------------------------- per reply


def format_valid(fmt: ActionFormat, text: str) -> bool:
    """True if ``text`` is a well-formed agent turn (any ``actions`` regex matches)."""
    return fmt.is_action(text)


def final_valid(fmt: ActionFormat, text: str) -> bool:
    """True if ``text`` holds a valid final action (any ``final`` regex matches)."""
    return fmt.is_final(text)


def action_type(fmt: ActionFormat, text: str) -> int | None:
    """Index of the first ``actions`` regex that matches ``text``; None if none does."""
    return next((i for i, p in enumerate(fmt.actions) if patterns.search(_compiled(p), text)), None)


def action_text(fmt: ActionFormat, text: str) -> str | None:
    """The action of a reply, reasoning removed and whitespace folded (see the module doc); None if no action."""
    kind = action_type(fmt, text)
    if kind is None:
        return None
    m = patterns.search(_compiled(fmt.actions[kind]), text)
    assert m is not None  # action_type found it
    start = m.start(_ACTION_GROUP) if _ACTION_GROUP in m.re.groupindex else m.start()
    return " ".join(text[start : _line_end(text, m.end())].split())


def exact_action_match(fmt: ActionFormat, a: str, b: str) -> bool:
    """True if both replies have an action and their action texts are equal."""
    action_a = action_text(fmt, a)
    return action_a is not None and action_a == action_text(fmt, b)


def tokens(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens (``\\w+|[^\\w\\s]``)."""
    return _TOKEN.findall(text.lower())


def token_f1(a: str, b: str) -> float:
    """SQuAD-style bag-of-tokens F1 of two texts; two token-less texts score 1.0, one scores 0.0."""
    ta, tb = tokens(a), tokens(b)
    if not ta or not tb:
        return float(not ta and not tb)
    same = sum((Counter(ta) & Counter(tb)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(ta), same / len(tb)
    return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------------------- aggregation


def mean_figure(values: list[float] | list[bool] | list[float | bool]) -> Figure:
    """Mean of ``values`` (booleans count as 0/1) with its sample size; value None when empty.

    A rate (every value a bool) also carries its 95% Wilson interval as ``interval``."""
    n = len(values)
    figure: Figure = {"value": sum(float(v) for v in values) / n if n else None, "n": n}
    if n and all(isinstance(v, bool) for v in values):
        figure["interval"] = wilson_interval(sum(values), n)
    return figure


Z95 = 1.959963984540054  # the normal quantile of a two-sided 95% interval


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a rate ``successes / n`` (95% by default): unlike the normal
    approximation it stays inside [0, 1] and is not empty at 0 or n successes."""
    if n <= 0:
        raise ValueError("a rate needs at least one trial")
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(
    samples: Sequence[T],
    statistic: Callable[[list[T]], float | None],
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of ``statistic`` over ``samples`` (one per input, resampled with
    replacement, fixed seed); resamples where the statistic is undefined are left out. None when
    fewer than half of them are defined (the interval would describe a different population)."""
    if not samples:
        return None
    rng = random.Random(seed)
    values = sorted(
        v for v in (statistic(rng.choices(samples, k=len(samples))) for _ in range(resamples)) if v is not None
    )
    if len(values) < resamples / 2:
        return None
    tail = (1 - level) / 2
    return values[int(tail * (len(values) - 1))], values[int(round((1 - tail) * (len(values) - 1)))]


def retention(adapter: float | None, teacher: float | None) -> float | None:
    """``adapter / teacher``: the share of the teacher's score the adapter keeps; None if undefined."""
    if adapter is None or teacher is None or teacher == 0:
        return None
    return adapter / teacher


def gap_closed(adapter: float | None, base: float | None, teacher: float | None) -> float | None:
    """Share of the base-to-teacher gap the adapter closes: ``(adapter - base) / (teacher - base)``.

    1 means the adapter matches the teacher, 0 the base, below 0 worse than the base. The same
    formula holds when lower is better (NLL, KL): numerator and denominator are then both
    negative for an improvement, so the signs cancel. None when ``teacher == base`` or any value
    is None.
    """
    if adapter is None or base is None or teacher is None or teacher == base:
        return None
    return (adapter - base) / (teacher - base)


# ---------------------------------------------------------------------------- patterns


@functools.lru_cache(maxsize=256)
def _compiled(pattern: str) -> patterns.Pattern:
    """``pattern`` compiled, with the part after its first top-level reasoning wildcard captured as the action."""
    cut = None if re.search(r"\\[1-9]", pattern) else _reasoning_end(pattern)
    if cut is None:
        return patterns.compiled(pattern)
    return patterns.compiled(f"{pattern[:cut]}(?P<{_ACTION_GROUP}>{pattern[cut:]})")


def _reasoning_end(pattern: str) -> int | None:
    """Offset just after the first reasoning wildcard outside any group; None if there is none or a top-level ``|``."""
    greedy = () if _DOTALL.search(pattern) else GREEDY_LINE_WILDCARDS
    depth, i, cut = 0, 0, None
    while i < len(pattern):
        ch = pattern[i]
        if depth == 0 and cut is None:
            hit = next((w for w in LAZY_WILDCARDS if pattern.startswith(w, i)), None)
            if hit is None:  # the action then starts with the line break
                hit = next(
                    (w for w in greedy if pattern.startswith(w, i) and pattern.startswith(_LINE_BREAKS, i + len(w))),
                    None,
                )
            if hit is not None:
                cut = i + len(hit)
                i = cut
                continue
        if ch == "\\":
            i += 2
        elif ch == "[":
            i = _class_end(pattern, i)
        elif ch == "(":
            depth += 1
            i += 1
        elif ch == ")":
            depth -= 1
            i += 1
        elif ch == "|" and depth == 0:
            return None
        else:
            i += 1
    return cut


def _line_end(text: str, end: int) -> int:
    """``end`` moved on to the end of its line, unless it already is at a line end."""
    if end == 0 or text[end - 1] == "\n":
        return end
    newline = text.find("\n", end)
    return len(text) if newline == -1 else newline


def _class_end(pattern: str, i: int) -> int:
    """Offset after the character class that opens at ``pattern[i] == "["``."""
    j = i + 1
    if j < len(pattern) and pattern[j] == "^":
        j += 1
    if j < len(pattern) and pattern[j] == "]":  # a leading ] is a literal
        j += 1
    while j < len(pattern) and pattern[j] != "]":
        j += 2 if pattern[j] == "\\" else 1
    return j + 1
