"""``genpi status [BATCH]``: where each prompt of a batch is (running or finished), from the store."""

from __future__ import annotations

import argparse

from genpi.batch.manifest import STAGES, batch_file, stored_batches
from genpi.cli.config_flags import add_flags, resolve
from genpi.errors import GenPIError
from genpi.store import store_for

HELP = "show each prompt's stage, progress, failure and artifacts (default: the newest batch)"


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=HELP)
    parser.add_argument("batch", nargs="?", help="batch id (default: the batch updated last)")
    add_flags(parser, ("store",))
    return parser


def describe(manifest: dict) -> str:
    """The batch as lines: its state and times, then one block per prompt."""
    state = manifest.get("state", "finished")
    when = (
        f"finished {manifest['finished_at']} after {manifest['seconds'] / 60:.1f} min"
        if state == "finished"
        else f"running since {manifest.get('started_at', '?')}, updated {manifest.get('updated_at', '?')}"
    )
    lines = [f"{state}: {when}"]
    for p in manifest["prompts"]:
        stage, status = p.get("stage", ""), p.get("status", "")
        done = len(p.get("seconds", {}))
        if status == "failed":
            line = f"FAILED in {stage}: {p['error']}"
        elif status == "done":
            line = f"published {p['published']}" if p.get("passed") else f"not published: {p.get('gate', '')}"
        else:
            line = f"{stage or 'waiting'} ({done} of {len(STAGES)} stages done)"
        times = ", ".join(f"{s} {t:.0f}s" for s, t in p.get("seconds", {}).items())
        lines.append(f"  {p['name']}: {line}" + (f"  [{times}]" if times else ""))
        lines += [f"      {name}: {where}" for name, where in p.get("artifacts", {}).items()]
    return "\n".join(lines)


def execute(args: argparse.Namespace) -> int:
    store = store_for(resolve(args).store)
    batches = stored_batches(store)
    if not batches:
        raise GenPIError(f"store {store.url} has no batches yet; start one with `genpi --store.url {store.url}`")
    if args.batch:
        key = batch_file(store, args.batch)
        batch, manifest = args.batch, store.get_json(key)
    else:  # the batch updated last (ISO times in UTC compare as strings)
        manifests = {b: store.get_json(k) for b, k in batches.items()}
        batch = max(manifests, key=lambda b: manifests[b].get("updated_at") or manifests[b].get("finished_at", ""))
        key, manifest = batches[batch], manifests[batch]
    print(f"batch {batch} ({store.location(key)})")
    print(describe(manifest))
    return 0
