"""``genpi``: one command, a subcommand each in its own module (``genpi <command> --help``).

``genpi [flags]`` with no command runs the job (``genpi run``), so ``jobs/internalize.py`` and
every older invocation keep working. A :class:`~genpi.errors.GenPIError` ends any command with
one line and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import sys
from types import ModuleType
from typing import NoReturn

from genpi.cli import ls, report, run, serve, status, verify
from genpi.cli.signals import EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated, on_sigterm_unwind
from genpi.errors import GenPIError

EXIT_BROKEN_PIPE = 141  # as a shell reports a command that SIGPIPE ended (`genpi report | head`)
COMMANDS: dict[str, ModuleType] = {
    "run": run,
    "report": report,
    "status": status,
    "ls": ls,
    "serve": serve,
    "verify": verify,
}


def build_parser(prog: str = "genpi") -> argparse.ArgumentParser:
    """The job's parser, its description listing the other commands (``genpi --help``)."""
    parser = run.build_parser(prog)
    width = max(map(len, COMMANDS))
    listing = "\n".join(f"  {prog} {name:<{width}}  {module.HELP}" for name, module in COMMANDS.items())
    parser.description = f"{parser.description}\n\ncommands (`{prog} COMMAND --help` for each):\n{listing}"
    return parser


def main(argv: list[str] | None = None, prog: str = "genpi") -> int:
    """Run one command; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        name, module = argv[0], COMMANDS[argv[0]]
        args = module.build_parser(f"{prog} {name}").parse_args(argv[1:])
    else:
        name, module = "run", run
        args = build_parser(prog).parse_args(argv)
    on_sigterm_unwind()
    try:
        return module.execute(args)
    except Terminated:
        print(f"{prog}: terminated (SIGTERM); finished work is in the store and a rerun resumes it", file=sys.stderr)
        return EXIT_TERMINATED
    except GenPIError as e:
        print(f"{prog}{'' if module is run else ' ' + name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; finished work is in the store and a rerun resumes it", file=sys.stderr)
        return EXIT_INTERRUPTED


def exit_process(code: int) -> NoReturn:
    """End the process with ``code``. After SIGTERM or Ctrl-C a stage's thread may still wait on a
    Ray cluster that the unwinding stopped, and the interpreter would join it for ever (a killed
    job's driver once spun on for ten minutes): the process then ends without joining threads,
    once logs and output are flushed."""
    if code in (EXIT_TERMINATED, EXIT_INTERRUPTED):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _reader_left() -> None:
    """The reader of our output closed it (``| head``): send what is left nowhere, so the
    interpreter's last flush raises nothing."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def entrypoint() -> None:
    """Console script ``genpi``."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        if not _stdout_closed():  # another pipe broke: that is an error of its own
            raise
        _reader_left()
        code = EXIT_BROKEN_PIPE
    exit_process(code)


def _stdout_closed() -> bool:
    """Whether nothing reads our standard output any more (a pipe's reader left)."""
    poll = select.poll()
    poll.register(sys.stdout.fileno(), select.POLLOUT)
    return any(events & select.POLLERR for _, events in poll.poll(0))
