"""Errors a user can act on.

Every failure caused by input (a prompt file, a config value, a store URL, a model name)
raises a :class:`GenPIError` whose message names the input and the fix. The CLI prints
these as one clear line and exits non-zero instead of showing a traceback.
"""

from __future__ import annotations

import difflib
import re
import reprlib
from collections.abc import Iterable

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 2, 60, 60
_REPR.maxdict = _REPR.maxlist = _REPR.maxtuple = _REPR.maxset = 4


def nearest(word: str, choices: Iterable[str], cutoff: float = 0.75) -> str | None:
    """The choice a mistyped ``word`` most likely meant, for "did you mean ...?": the one whose last
    part's words it spells by their initials (``--train.lr`` → ``--train.learning-rate``; None when
    several do), else the closest spelling (difflib), else None."""
    choices = list(choices)
    head, _, tail = word.replace("_", "-").rpartition(".")

    def spelled(choice: str) -> bool:
        c_head, _, c_tail = choice.replace("_", "-").rpartition(".")
        words = c_tail.lstrip("-").split("-")
        initials = "".join(w[0] for w in words if w)
        return c_head == head and len(words) > 1 and min(map(len, words)) > 1 and initials == tail.lstrip("-")

    by_initials = [c for c in choices if spelled(c)]
    if by_initials:  # "mt" spells max-tokens and max-turns: no guess then
        return by_initials[0] if len(by_initials) == 1 else None
    close = difflib.get_close_matches(
        word.replace("_", "-"), [c.replace("_", "-") for c in choices], n=1, cutoff=cutoff
    )
    return next((c for c in choices if c.replace("_", "-") == close[0]), None) if close else None


def short_repr(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to about ``limit`` characters, in time bounded by ``limit`` too: error
    messages quote input with it, so a huge or self-referencing value never blows up a message."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_SURROGATE = re.compile("[\ud800-\udfff]")


def unpaired_surrogate(text: str) -> int | None:
    """Where ``text`` holds an unpaired surrogate (JSON and YAML escapes such as \\ud800 make them;
    no UTF-8 file or tokenizer can hold one), or None."""
    found = _SURROGATE.search(text)
    return found.start() if found else None


class GenPIError(Exception):
    """Base class for errors caused by user input or environment; the message is the fix."""


class ConfigError(GenPIError):
    """A config field has a bad value; the message names the field and the allowed values."""


class PromptError(GenPIError):
    """A prompt file cannot be used; the message names the file."""


class StoreError(GenPIError):
    """The artifact store cannot be reached or used; the message names the store URL."""


class ArtifactNotFound(StoreError):
    """A key that was read does not exist in the store."""


class ModelError(GenPIError):
    """A model name or folder cannot be resolved or loaded."""


class EngineError(GenPIError):
    """An engine actor died more often than it may be restarted."""
