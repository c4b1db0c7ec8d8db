"""Devices and threads: torch threads follow the CPUs Ray reserved."""

from __future__ import annotations

import os

import pytest

from genpi.config import RayConfig


@pytest.fixture(scope="module")
def ray_cluster():
    from genpi import ray_runtime

    ray_runtime.connect(RayConfig(num_cpus=2, dashboard=False))
    yield
    ray_runtime.disconnect()


def test_threads_follow_the_ray_reservation(ray_cluster: None) -> None:
    import ray

    from genpi.devices import cpu_threads

    @ray.remote
    def threads(configured: int) -> int:
        return cpu_threads(configured)

    assert ray.get(threads.options(num_cpus=1).remote(0), timeout=60) == 1
    assert ray.get(threads.options(num_cpus=2).remote(0), timeout=60) == 2
    assert ray.get(threads.options(num_cpus=0.5).remote(0), timeout=60) == 1  # at least one
    assert ray.get(threads.options(num_cpus=1).remote(3), timeout=60) == 3  # a configured count wins
    assert cpu_threads() == len(os.sched_getaffinity(0))  # the driver is no Ray task: every core


def test_bf16_on_an_x86_cpu_without_avx512_is_warned_about(monkeypatch) -> None:
    import platform

    import torch

    from genpi.devices import slow_bf16_warning

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    line = slow_bf16_warning({"target": "bfloat16", "generator": "bfloat16"})
    assert line and "AVX2" in line and "--models.generator.dtype float32 --models.target.dtype float32" in line
    only_target = slow_bf16_warning({"target": "bfloat16", "generator": "float32"})
    assert only_target and "--models.target.dtype" in only_target and "generator" not in only_target
    assert slow_bf16_warning({"target": "float32", "generator": "float32"}) is None
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert slow_bf16_warning({"target": "bfloat16"}) is None
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert slow_bf16_warning({"target": "bfloat16"}) is None
