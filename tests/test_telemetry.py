"""The job's metrics reach Ray's Prometheus endpoint, tagged by prompt; outside Ray they are a no-op."""

from __future__ import annotations

import os
import socket
import time
import urllib.request

import pytest

from genpi import telemetry


def test_recording_outside_ray_does_nothing() -> None:
    import ray

    assert not ray.is_initialized()
    telemetry.stage_done("p", "synthesis", 1.0)  # no cluster, no error
    telemetry.train_step("p", "run", 1, 0.5, 100.0)
    assert not ray.is_initialized()  # recording never starts a cluster of its own


@pytest.mark.timeout(120)
def test_metrics_reach_the_prometheus_endpoint_tagged_by_prompt() -> None:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=1, include_dashboard=False, _metrics_export_port=port, _node_ip_address="127.0.0.1")
    try:

        @ray.remote
        def stage() -> None:  # recorded in a worker, as the stages record
            telemetry.stage_done("shell-agent", "synthesis", 42.0)
            telemetry.train_step("shell-agent", "abc", 3, 0.25, 120.0)

        ray.get(stage.remote())
        telemetry.gate_figures("shell-agent", {"format_valid_retention": 1.0, "nll_gap_closed": None})
        telemetry.prompt_ended("published")
        wanted = (
            "ray_genpi_stage_seconds_count",
            "ray_genpi_train_loss",
            "ray_genpi_gate_fidelity",
            "ray_genpi_prompts",
        )
        body, deadline = "", time.time() + 60
        while time.time() < deadline and not all(name in body for name in wanted):
            time.sleep(1)
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            except OSError:
                continue
        lines = [line for line in body.splitlines() if line.startswith("ray_genpi")]
        assert all(any(line.startswith(name) for line in lines) for name in wanted), lines
        assert any('prompt="shell-agent"' in line and 'stage="synthesis"' in line for line in lines)
        assert any(line.startswith("ray_genpi_train_loss") and line.endswith(" 0.25") for line in lines)
        assert not any('metric="nll_gap_closed"' in line for line in lines)  # a figure that was not measured
    finally:
        ray.shutdown()
