"""The argument parser every command uses: a mistake in the flags is one line, not the whole usage."""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

from genpi.errors import nearest


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors name the bad flag, suggest the nearest real one and
    point at ``--help``; flags are never abbreviated (``--prompt`` is not taken for ``--prompts``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        hint = ""
        if message.startswith("unrecognized arguments:"):
            flags = [word for word in message.split(":", 1)[1].split() if word.startswith("--")]
            known = [s for s in self._option_string_actions if s.startswith("--")]
            for flag in flags:
                if close := nearest(flag.split("=", 1)[0], known):
                    hint = f"; did you mean {close}?"
                    break
        sys.stderr.write(f"{self.prog}: error: {message}{hint} (`{self.prog} --help` lists every flag)\n")
        sys.exit(2)
