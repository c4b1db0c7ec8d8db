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
