"""Which Python environment runs a backend's engine actors, and what ``backend: auto`` means here.

vLLM's CPU build pins an older transformers than genpi needs, so on CPU machines it lives in its
own virtual environment (``make install-vllm`` builds ``.venv-vllm`` in the checkout) and Ray starts
the engine actors on that interpreter. On a GPU node where ``vllm`` is installed beside genpi, the
actors run in the job's own environment.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from genpi.config import GenPIConfig
from genpi.errors import ModelError

_CHECKOUT_VLLM = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"


def vllm_python(configured: str = "") -> str | None:
    """The interpreter for vLLM engine actors: "" for this environment, a path for another one,
    None when vLLM is nowhere to be found. Order: the config, ``GENPI_VLLM_PYTHON``, this
    environment, the checkout's ``.venv-vllm``."""
    explicit = configured or os.environ.get("GENPI_VLLM_PYTHON", "")
    if explicit:
        if not (Path(explicit).is_file() and os.access(explicit, os.X_OK)):
            raise ModelError(
                f"the vLLM interpreter {explicit} is not an executable file; run `make install-vllm` or "
                f"point models.<role>.python (or GENPI_VLLM_PYTHON) at a Python with vLLM"
            )
        return explicit
    if importlib.util.find_spec("vllm") is not None:
        return ""
    return str(_CHECKOUT_VLLM) if _CHECKOUT_VLLM.is_file() else None


def resolve_backend(backend: str, configured_python: str = "") -> str:
    """``auto`` becomes ``vllm`` where vLLM is installed and ``hf`` elsewhere; others stay as given."""
    if backend != "auto":
        return backend
    return "vllm" if vllm_python(configured_python) is not None else "hf"


def resolve_backends(cfg: GenPIConfig) -> GenPIConfig:
    """``cfg`` with every model role's ``backend: auto`` resolved for this machine (in place).

    Done where a job starts, before any store key is computed: the backend is part of the
    synthesis key, and the config itself stays a schema that probes nothing."""
    for model in (cfg.models.generator, cfg.models.target):
        model.backend = resolve_backend(model.backend, model.python)
    return cfg


def engine_runtime_env(backend: str, configured_python: str = "") -> dict[str, str]:
    """The Ray ``runtime_env`` of an engine actor for ``backend``."""
    if backend != "vllm":
        return {}
    python = vllm_python(configured_python)
    if python is None:
        raise ModelError(
            "backend 'vllm' needs vLLM: run `make install-vllm` (CPU, builds .venv-vllm) or "
            "`pip install vllm` on a GPU node, or set models.<role>.backend to hf"
        )
    return {"py_executable": python} if python else {}


def serve_backend(cfg: GenPIConfig) -> tuple[str, dict[str, str]]:
    """The model replicas' engine (``serve.backend``; ``auto`` is vllm on a replica with a GPU where
    vLLM is found, hf otherwise) and the Ray ``runtime_env`` their actors run in."""
    backend = cfg.serve.backend
    if backend == "hf" or (backend == "auto" and cfg.serve.num_gpus <= 0):
        return "hf", {}
    python = vllm_python(cfg.models.target.python)
    if python is None:
        if backend == "auto":
            return "hf", {}
        raise ModelError(
            "serve.backend vllm needs vLLM: run `make install-vllm` (CPU, builds .venv-vllm) or "
            "`pip install vllm` on a GPU node, or set serve.backend to hf"
        )
    return "vllm", ({"py_executable": python} if python else {})
