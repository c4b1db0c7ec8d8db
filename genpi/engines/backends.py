"""Engine backends by name (``models.<role>.backend``): each is one module with a ``build(cfg)``.

Adding a backend is its module plus one line here and its name in the config's choices (a test
checks the two agree). Modules are imported only when a backend is built, so vLLM is never
imported where it is not used.
"""

from __future__ import annotations

import importlib

from genpi.config import ModelConfig
from genpi.engines.base import Engine

BACKENDS = {"hf": "genpi.engines.hf", "vllm": "genpi.engines.vllm"}


def build_engine(cfg: ModelConfig) -> Engine:
    """The engine for one model role, on its configured backend."""
    if cfg.backend not in BACKENDS:  # "auto" is resolved where a job starts (environments.resolve_backends)
        raise ValueError(f"no engine backend {cfg.backend!r}; known: {', '.join(BACKENDS)}")
    return importlib.import_module(BACKENDS[cfg.backend]).build(cfg)
