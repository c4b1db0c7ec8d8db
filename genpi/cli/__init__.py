"""The ``genpi`` command line: ``genpi run | report | ls`` (bare ``genpi [flags]`` is ``genpi run``)."""

from genpi.cli.main import entrypoint, main

__all__ = ["entrypoint", "main"]
