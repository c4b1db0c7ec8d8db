"""``genpi verify [BATCH]``: check that a store holds the bytes its markers and manifests vouch for."""

from __future__ import annotations

import argparse

from genpi import registry
from genpi.batch.manifest import REWRITE, batch_file
from genpi.cli.config_flags import add_flags, resolve
from genpi.cli.parser import Parser
from genpi.store import store_for
from genpi.store.base import DONE_MARKER

HELP = "check every finished stage and published adapter (of one batch, or the whole store) against its digests"


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description=HELP)
    parser.add_argument("batch", nargs="?", help="batch id (batches/<id>/ in the store; default: the whole store)")
    add_flags(parser, ("store",))
    return parser


def execute(args: argparse.Namespace) -> int:
    """Print one line per file that differs from what vouches for it; exit 1 when there is any."""
    store = store_for(resolve(args).store, existing=True)
    roots, prompts = ["prompts"], None
    if args.batch:
        key = batch_file(store, args.batch)
        manifest = store.get_json(key)
        with store.reading(key, "a batch manifest", REWRITE):
            roots = [f"prompts/{p['name']}/{p['prompt_hash']}" for p in manifest["prompts"]]
            prompts = {p["name"] for p in manifest["prompts"]}
    markers = [k for root in roots for k in store.list_keys(root) if k.rsplit("/", 1)[-1] == DONE_MARKER]
    problems = [line for k in markers for line in store.done_problems(k.rsplit("/", 1)[0])]
    unreadable: list[str] = []
    adapters = [a for a in registry.published(store, unreadable=unreadable) if prompts is None or a.prompt in prompts]
    problems += unreadable + [line for a in adapters for line in registry.problems(store, a)]
    for line in problems:
        print(line)
    checked = f"{len(markers)} finished stages and {len(adapters)} published adapters in {store.url}"
    print(f"{checked}: {len(problems)} problems" if problems else f"{checked}: every file matches")
    return 1 if problems else 0
