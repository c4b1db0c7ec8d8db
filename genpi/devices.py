"""Devices and dtypes, shared by the engines, training and evaluation."""

from __future__ import annotations

import os
import platform
import sys

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def pick_device(device: str) -> str:
    """``auto`` is cuda when this process sees a GPU, else cpu."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def slow_bf16_warning(dtypes: dict[str, str]) -> str | None:
    """A warning when models run in bf16 on an x86 CPU without AVX-512 and no GPU is here: PyTorch
    has no fast bf16 matmul there (the embedded model generated 2.4x slower in bf16 than in float32
    on a 2-core AMD EPYC with AVX2). ``dtypes``: role -> configured dtype."""
    roles = sorted(role for role, dtype in dtypes.items() if dtype == "bfloat16")
    capability = torch.backends.cpu.get_cpu_capability()
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if not roles or torch.cuda.is_available() or not x86 or capability not in ("AVX2", "NO AVX", "DEFAULT"):
        return None
    flags = " ".join(f"--models.{role}.dtype float32" for role in roles)
    return (
        f"this CPU has {capability} and no AVX-512, where bf16 runs slower than float32: "
        f"pass {flags} to run in float32 (the weights take twice the memory)"
    )


def cpu_threads(configured: int = 0) -> int:
    """Torch CPU threads for this process: ``configured`` when it is set; inside a Ray task or
    actor, the CPUs Ray reserved for it (at least one), so that work sharing a node does not
    oversubscribe its cores; elsewhere every core this process may run on."""
    if configured:
        return configured
    reserved = _ray_reserved_cpus()
    if reserved is not None:
        return max(1, int(reserved))
    return len(os.sched_getaffinity(0)) or 1


def _ray_reserved_cpus() -> float | None:
    """The CPUs Ray assigned to the current task or actor; None in a driver or outside Ray."""
    ray = sys.modules.get("ray")  # a process that never imported Ray is not a Ray worker
    if ray is None or not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    if context.worker.mode != ray.WORKER_MODE:
        return None
    return context.get_assigned_resources().get("CPU")
