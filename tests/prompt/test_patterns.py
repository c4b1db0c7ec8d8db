"""Tests for genpi.prompt.patterns: action-format regexes match as ``re`` does, in bounded time."""

from __future__ import annotations

import re
import time

import pytest

from genpi.errors import PromptError
from genpi.prompt import patterns
from genpi.prompt.files import load_prompts
from tests.repo import ROOT

PROMPT_FOLDERS = (ROOT / "prompts", ROOT / "bench" / "heldout" / "prompts")


def _shipped_specs() -> list:
    return [spec for folder in PROMPT_FOLDERS for spec in load_prompts(folder)]


def test_every_shipped_and_held_out_pattern_matches_its_prompts_turns_as_re_does() -> None:
    checked = 0
    for spec in _shipped_specs():
        texts = [t.content for t in spec.turns] + [t.content + "\nmore" for t in spec.turns]
        for pattern in spec.action_format.actions + spec.action_format.final:
            assert patterns.check_speed(pattern) is None, (spec.name, pattern)
            for text in texts:
                ours, theirs = patterns.search(pattern, text), re.search(pattern, text, re.MULTILINE)
                assert (ours and ours.span()) == (theirs and theirs.span()), (spec.name, pattern, text[:80])
                checked += theirs is not None
    assert checked >= 10  # the worked examples' replies match their own format


def test_a_pattern_that_backtracks_forever_in_re_answers_at_once() -> None:
    # With re, this search takes ~8x longer per word: 20 words do not finish in a minute.
    reply = "Thought: I will look at the page and pick the product that fits the instruction best now!"
    started = time.monotonic()
    assert patterns.search(r"^(\w+\s?)+$", reply) is None
    assert time.monotonic() - started < 1


def test_a_pattern_slow_here_too_is_refused_at_load_and_stopped_when_matching(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert "backtracks without bound" in (patterns.check_speed(r"^(a|aa)+$") or "")
    assert patterns.check_speed(r"^Action: click\[[^\[\]]+\]$") is None
    monkeypatch.setattr(patterns, "MATCH_TIMEOUT_S", 0.1)
    with pytest.raises(PromptError, match=r"regex '\^\(\.\*\?,\)\{40\}y' took over 0.1 s"):
        patterns.search(r"^(.*?,){40}y", "1," * 40 + "x")
