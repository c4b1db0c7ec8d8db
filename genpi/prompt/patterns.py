"""A prompt's action-format regexes, matched in bounded time.

The patterns come from the prompt's author and are searched in every reply of every stage. With
Python's ``re`` a pattern with nested quantifiers (``^(\\w+\\s?)+$``) backtracks exponentially: one
ordinary 20-word reply then never finishes matching, and the stage hangs. The ``regex`` package
reads the same syntax, matches these shipped and held-out patterns exactly as ``re`` does, avoids
most such blow-ups, and stops a search that still runs past :data:`MATCH_TIMEOUT_S` with an error
that names the pattern.
"""

from __future__ import annotations

import functools

import regex

from genpi.errors import PromptError, short_repr

MATCH_TIMEOUT_S = 2.0  # a reply of a few thousand characters takes well under a millisecond
PROBE_TIMEOUT_S = 0.25  # a probe is a few hundred characters
# Text that makes a backtracking pattern blow up: long runs a nested quantifier can split many ways,
# ended by a character that makes the match fail.
_PROBES = ("word " * 40 + "!", "a" * 80 + "!", "Thought: a\n" * 30 + "!", " \t" * 40 + "!", "1," * 40 + "x")

Pattern = regex.Pattern
error = regex.error


@functools.lru_cache(maxsize=256)
def compiled(pattern: str) -> Pattern:
    """``pattern`` compiled with ``MULTILINE`` (raises :data:`error` when it is not a regex)."""
    return regex.compile(pattern, regex.MULTILINE)


def search(pattern: str | Pattern, text: str) -> regex.Match | None:
    """The first match of ``pattern`` in ``text``; a PromptError when matching takes too long."""
    compiled_pattern = compiled(pattern) if isinstance(pattern, str) else pattern
    try:
        return compiled_pattern.search(text, timeout=MATCH_TIMEOUT_S)
    except TimeoutError:
        raise PromptError(f"action_format {too_slow(compiled_pattern.pattern, len(text), MATCH_TIMEOUT_S)}") from None


def check_speed(pattern: str) -> str | None:
    """Why ``pattern`` is too slow to use (it blows up on text built to make it backtrack), or None."""
    for probe in _PROBES:
        try:
            compiled(pattern).search(probe, timeout=PROBE_TIMEOUT_S)
        except TimeoutError:
            return too_slow(pattern, len(probe), PROBE_TIMEOUT_S)
    return None


def too_slow(pattern: str, length: int, seconds: float) -> str:
    return (
        f"regex {short_repr(pattern)} took over {seconds:g} s to search {length} characters "
        "(it backtracks without bound); rewrite it so that no repeated group can match the same "
        "text in more than one way (the shape to avoid: (\\w+\\s?)+)"
    )
