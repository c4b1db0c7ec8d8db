"""``python -m genpi.cli``: the ``genpi`` command."""

from genpi.cli.main import entrypoint

entrypoint()
