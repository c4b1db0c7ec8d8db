"""Content addresses: stable hashes of JSON-able values.

Artifacts are stored under the hash of everything that produced them, so a rerun with the
same prompt and stage config finds finished work, and any change reruns only what depends
on it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace; dataclasses become dicts."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def fingerprint(value: Any, length: int = 12) -> str:
    """Hex SHA-256 of the canonical JSON of ``value``, cut to ``length`` characters."""
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()[:length]
