"""``genpi ls``: list the published adapters, newest first, as the registry sees them."""

from __future__ import annotations

import argparse

from genpi import registry
from genpi.cli.config_flags import add_flags, resolve
from genpi.store import store_for

HELP = "list the published adapters (name@version, base model, gate figures, location)"


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=HELP)
    add_flags(parser, ("store",))
    return parser


def execute(args: argparse.Namespace) -> int:
    cfg = resolve(args)
    store = store_for(cfg.store)
    adapters = registry.published(store)
    if not adapters:
        print(f"no published adapters in {store.url}")
        return 0
    for a in adapters:
        fmt, nll = a.retention.get("format_valid"), a.gap_closed.get("nll")
        figures = ", ".join(
            part
            for part in (
                f"format retention {fmt:.0%}" if fmt is not None else "",
                f"NLL gap closed {nll:.0%}" if nll is not None else "",
            )
            if part
        )
        print(f"{a.name}  base {a.base_model}  published {a.published_at}  {figures}\n    {store.location(a.prefix)}")
    return 0
