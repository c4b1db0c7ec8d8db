"""``genpi report [BATCH]``: print a batch's fidelity table from the store (the newest by default)."""

from __future__ import annotations

import argparse

from genpi.batch.manifest import REWRITE, batch_file, stored_batches
from genpi.cli.config_flags import add_flags, resolve
from genpi.cli.parser import Parser
from genpi.errors import GenPIError
from genpi.evaluate.report import batch_table
from genpi.store import ArtifactStore, store_for

HELP = "print a batch's fidelity table (default: the newest batch in the store)"


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description=HELP)
    parser.add_argument("batch", nargs="?", help="batch id (default: the newest batch in the store)")
    add_flags(parser, ("store",))
    return parser


def execute(args: argparse.Namespace) -> int:
    cfg = resolve(args)
    store = store_for(cfg.store, existing=True)
    reports = stored_batches(store, "report.json")
    if not reports:
        raise GenPIError(
            f"store {store.url} has no batch reports yet; run the job first "
            f"(make run, or genpi --store.url {store.url})"
        )
    if args.batch is None:
        batch = max(reports, key=lambda b: _finished(store, reports[b]))
    else:
        batch = args.batch  # an empty id is a mistake to name, not a request for the newest
    key = batch_file(store, batch, "report.json")
    data = store.get_json(key)
    with store.reading(key, "a batch report", REWRITE):
        print(f"batch {batch}, finished {data['finished_at']} ({store.location(key)})\n")
        print(batch_table(data["prompts"]))
    return 0


def _finished(store: ArtifactStore, key: str) -> str:
    """When the batch report at ``key`` was finished."""
    data = store.get_json(key)
    with store.reading(key, "a batch report", REWRITE):
        return str(data["finished_at"])
