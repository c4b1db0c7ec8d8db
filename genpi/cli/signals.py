"""SIGTERM (what ``ray job stop`` and Kubernetes send) ends a command as Ctrl-C does: it unwinds, so
``finally`` blocks stop what the process started, and the command exits with one line."""

from __future__ import annotations

import signal
import threading

EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process that SIGTERM ended
EXIT_INTERRUPTED = 130  # 128 + SIGINT


class Terminated(BaseException):
    """SIGTERM arrived (a BaseException, so no ``except Exception`` swallows it)."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def on_sigterm_unwind() -> None:
    """Make SIGTERM raise :class:`Terminated` in the main thread. Call it again after ``ray.init``,
    which installs a handler of its own (one that exits with code 15)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
