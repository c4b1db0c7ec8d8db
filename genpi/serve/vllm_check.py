"""``genpi serve --check`` where the replicas run vLLM: every published version checked on vLLM,
as a replica checks it when it loads it (digests, then :func:`~genpi.serve.vllm_deployment.parity_check`).

Run by ``genpi serve --check`` on the interpreter that has vLLM (``.venv-vllm`` on CPU), with the
resolved config as JSON on stdin: ``python -m genpi.serve.vllm_check < config.json``. Prints one
line per version; exit code 1 when one fails.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from genpi import registry
from genpi.config import GenPIConfig, config_from_dict
from genpi.errors import GenPIError
from genpi.serve.vllm_deployment import parity_check, serving_engine
from genpi.store import store_for


async def check_published(cfg: GenPIConfig) -> int:
    """Print each published version's check on vLLM; 1 when one fails."""
    store = store_for(cfg.store, existing=True)
    entries = registry.published(store)
    if not entries:
        print(f"no published adapters in {store.url}")
        return 0
    engine = serving_engine(cfg)
    try:
        return await _check_each(store, entries, engine)
    finally:
        engine.shutdown()
        engine.llm = None  # its __del__ runs now: at interpreter exit, vLLM's cleanup fails on torn-down globals


async def _check_each(store: Any, entries: list[registry.PublishedAdapter], engine: Any) -> int:
    base_replies: dict[str, str] = {}  # the base model's probe answers, shared by every version
    failed = 0
    for entry in entries:
        with tempfile.TemporaryDirectory(prefix="genpi-check-") as tmp:
            try:
                folder = registry.download(store, entry, Path(tmp))
                name = await engine.add_adapter(folder)
                try:
                    outcome = await parity_check(engine, name, entry, base_replies)
                finally:
                    await engine.remove_adapter(name)
            except GenPIError as e:  # refused, altered files, a rank above the engine's, ...
                outcome, failed = f"FAILED: {e}", failed + 1
        print(f"{entry.name}: {outcome} (on vLLM)", flush=True)
    return 1 if failed else 0


def main() -> int:
    try:
        return asyncio.run(check_published(config_from_dict(json.load(sys.stdin))))
    except GenPIError as e:
        print(f"genpi serve --check: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # vLLM's engine starts its workers by spawning this module again
    sys.exit(main())
