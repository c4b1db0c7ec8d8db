"""Errors a user can act on.

Every failure caused by input (a prompt file, a config value, a store URL, a model name)
raises a :class:`GenPIError` whose message names the input and the fix. The CLI prints
these as one clear line and exits non-zero instead of showing a traceback.
"""

from __future__ import annotations

import re
import reprlib

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 2, 60, 60
_REPR.maxdict = _REPR.maxlist = _REPR.maxtuple = _REPR.maxset = 4


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
