"""``genpi verify [BATCH]``: check that a store holds the bytes its markers and manifests vouch for."""

from __future__ import annotations

import argparse

from genpi import registry
from genpi.batch.manifest import batch_file
from genpi.cli.config_flags import add_flags, resolve
from genpi.store import store_for
from genpi.store.base import DONE_MARKER

HELP = "check every finished stage and published adapter (of one batch, or the whole store) against its digests"


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=HELP)
    parser.add_argument("batch", nargs="?", help="batch id (batches/<id>/ in the store; default: the whole store)")
    add_flags(parser, ("store",))
    return parser


def execute(args: argparse.Namespace) -> int:
    """Print one line per file that differs from what vouches for it; exit 1 when there is any."""
    store = store_for(resolve(args).store)
    roots, prompts = ["prompts"], None
    if args.batch:
        entries = store.get_json(batch_file(store, args.batch))["prompts"]
        roots = [f"prompts/{p['name']}/{p['prompt_hash']}" for p in entries]
        prompts = {p["name"] for p in entries}
    markers = [k for root in roots for k in store.list_keys(root) if k.rsplit("/", 1)[-1] == DONE_MARKER]
    problems = [line for k in markers for line in store.done_problems(k.rsplit("/", 1)[0])]
    adapters = [a for a in registry.published(store) if prompts is None or a.prompt in prompts]
    problems += [line for a in adapters for line in registry.problems(store, a)]
    for line in problems:
        print(line)
    checked = f"{len(markers)} finished stages and {len(adapters)} published adapters in {store.url}"
    print(f"{checked}: {len(problems)} problems" if problems else f"{checked}: every file matches")
    return 1 if problems else 0
