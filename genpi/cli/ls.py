"""``genpi ls``: list the published adapters, newest first, as the registry sees them."""

from __future__ import annotations

import argparse

from genpi import registry
from genpi.cli.config_flags import add_flags, resolve
from genpi.cli.parser import Parser
from genpi.evaluate.report import pct_interval
from genpi.store import store_for

HELP = "list the published adapters (name@version, base model, gate figures with their 95% intervals, location)"


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description=HELP)
    add_flags(parser, ("store",))
    return parser


def execute(args: argparse.Namespace) -> int:
    cfg = resolve(args)
    store = store_for(cfg.store, existing=True)
    adapters = registry.published(store)
    if not adapters:
        print(f"no published adapters in {store.url}")
        return 0
    for a in adapters:
        figures = ", ".join(
            f"{label} {pct_interval(value, _gate_interval(a, metric, kind))}"
            for label, metric, kind, value in (
                ("format retention", "format_valid", "retention", a.retention.get("format_valid")),
                ("NLL gap closed", "nll", "gap_closed", a.gap_closed.get("nll")),
            )
            if value is not None
        )
        print(f"{a.name}  base {a.base_model}  published {a.published_at}  {figures}\n    {store.location(a.prefix)}")
    return 0


def _gate_interval(adapter: registry.PublishedAdapter, metric: str, kind: str) -> list[float] | None:
    """The 95% interval the gate checked for ``metric``'s ``kind`` (None in manifests without one)."""
    for check in adapter.gate.get("checks", []):
        if check.get("metric") == metric and check.get("kind") == kind:
            return check.get("interval")
    return None
