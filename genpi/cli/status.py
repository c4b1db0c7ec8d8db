"""``genpi status [BATCH]``: where each prompt of a batch is (running or finished), from the store."""

from __future__ import annotations

import argparse

from genpi.batch.manifest import REWRITE, STAGES, batch_file, stored_batches
from genpi.cli.config_flags import add_flags, resolve
from genpi.cli.parser import Parser
from genpi.errors import GenPIError
from genpi.store import ArtifactStore, store_for

HELP = "show each prompt's stage, progress, failure and artifacts (default: the batch updated last)"


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description=HELP)
    parser.add_argument("batch", nargs="?", help="batch id (default: the batch updated last)")
    add_flags(parser, ("store",))
    return parser


def describe(manifest: dict) -> str:
    """The batch as lines: its state and times, then one block per prompt."""
    state = manifest.get("state", "finished")
    when = (
        f"finished {manifest['finished_at']} after {manifest['seconds'] / 60:.1f} min"
        if state == "finished"
        else f"{state}: running since {manifest.get('started_at', '?')}, updated {manifest.get('updated_at', '?')}"
    )
    lines = [when]
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
    store = store_for(resolve(args).store, existing=True)
    batches = stored_batches(store)
    if not batches:
        raise GenPIError(f"store {store.url} has no batches yet; start one with `genpi --store.url {store.url}`")
    if args.batch:
        key = batch_file(store, args.batch)
        batch, (_, text) = args.batch, _described(store, key)
    else:  # the batch updated last (ISO times in UTC compare as strings)
        described = {b: _described(store, k) for b, k in batches.items()}
        batch = max(described, key=lambda b: described[b][0])
        key, (_, text) = batches[batch], described[batch]
    print(f"batch {batch} ({store.location(key)})")
    print(text)
    return 0


def _described(store: ArtifactStore, key: str) -> tuple[str, str]:
    """A batch manifest's last update time and its description."""
    manifest = store.get_json(key)
    with store.reading(key, "a batch manifest", REWRITE):
        return str(manifest.get("updated_at") or manifest.get("finished_at", "")), describe(manifest)
