"""Trust: a local cluster takes work only from its driver, and nothing of it outlives the driver."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from genpi.config import RayConfig
from genpi.reaper import marked_pids
from tests.repo import ROOT


def _post_job(url: str, headers: dict[str, str]) -> int:
    request = urllib.request.Request(
        f"{url}/api/jobs/",
        data=json.dumps({"entrypoint": "id"}).encode(),
        headers={"Content-Type": "application/json", **headers},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_free_port_is_above_rays_worker_ports_below_the_ephemeral_range_and_not_in_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from genpi import ray_runtime

    ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    with socket.socket() as held:
        held.bind(("127.0.0.1", ray_runtime.free_port()))
        busy, spare = held.getsockname()[1], ray_runtime.free_port()
        assert busy != spare and all(20000 <= port < ephemeral for port in (busy, spare))
        tries = iter([busy, spare])
        monkeypatch.setattr(ray_runtime.random, "randrange", lambda low, high: next(tries))
        assert ray_runtime.free_port() == spare


def test_the_s3_servers_ports_and_their_grpc_twins_are_below_the_ephemeral_range() -> None:
    from tests.s3_server import _GRPC_OFFSET, _free_ports

    ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = _free_ports(5)
    twins = [port + _GRPC_OFFSET for port in ports]
    assert len(set(ports + twins)) == 10
    assert all(20000 <= port < ephemeral for port in ports + twins)


def test_a_bad_ray_address_or_temp_folder_is_one_error_before_ray_starts(tmp_path: Path) -> None:
    from genpi import ray_runtime
    from genpi.errors import ConfigError, GenPIError

    for address in ("garbage:::", "host:", "host:port", "127.0.0.1:99999"):
        with pytest.raises(ConfigError, match="is not host:port"):
            ray_runtime.check_reachable(address)
    with socket.socket() as closed:  # a port bound but not listening: connections are refused
        closed.bind(("127.0.0.1", ray_runtime.free_port()))
        address = f"127.0.0.1:{closed.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(GenPIError, match=f"cannot reach the Ray cluster at {address}"):
            ray_runtime.connect(RayConfig(address=address))
        assert time.monotonic() - started < 5
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="ray.temp_dir .* cannot be created"):
        ray_runtime.connect(RayConfig(temp_dir=str(tmp_path / "file" / "sub")))


@pytest.mark.timeout(180)
def test_jobs_api_refuses_a_request_without_the_token() -> None:
    from genpi import ray_runtime

    line = ray_runtime.connect(RayConfig(num_cpus=1, dashboard=True))
    try:
        url = line.split("dashboard on ", 1)[1].split(",")[0]
        assert url.startswith("http://127.0.0.1:")
        temp_dir = line.rsplit("temp folder ", 1)[1]
        assert _post_job(url, {}) == 401
        assert _post_job(url, {"Authorization": "Bearer " + "0" * 64}) == 403
        request = urllib.request.Request(
            f"{url}/api/jobs/", headers={"Authorization": f"Bearer {ray_runtime.auth_token()}"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:  # the driver itself gets in
            assert response.status == 200
    finally:
        ray_runtime.disconnect()
    assert not Path(temp_dir).exists()  # a private temp folder goes with its cluster


DRIVER = """
import os, sys, tempfile, time
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
import ray
from genpi import ray_runtime
from genpi.config import RayConfig
print(ray_runtime.connect(RayConfig(num_cpus=1, dashboard=True)), flush=True)
print("marker", os.environ["GENPI_RAY_CLUSTER"], flush=True)

@ray.remote
def hold():
    folder = tempfile.mkdtemp(prefix="genpi-adapter-")  # a worker's scratch, as training keeps one
    print("scratch", folder, flush=True)
    time.sleep(600)

ref = hold.remote()
time.sleep(600)
"""


@pytest.mark.timeout(240)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_no_process_or_temp_folder_outlives_a_killed_driver(tmp_path: Path, sig: signal.Signals) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "driver.log"
    with open(log, "w") as out:
        driver = subprocess.Popen(
            [sys.executable, "-c", DRIVER], stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 150
        while "scratch " not in log.read_text() and time.monotonic() < deadline:
            assert driver.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        text = log.read_text()
        temp_dir = text.split("temp folder ", 1)[1].split()[0]
        scratch = text.split("scratch ", 1)[1].split()[0]
        assert scratch.startswith(temp_dir) and Path(scratch).is_dir()
        marker = text.split("marker ", 1)[1].split()[0]
        assert len(marked_pids(marker, {driver.pid})) >= 4  # gcs, raylet, agents, the worker
        driver.send_signal(sig)
        driver.wait(timeout=30)
        deadline = time.monotonic() + 30
        while (marked_pids(marker, set()) or Path(temp_dir).exists()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert marked_pids(marker, set()) == []
        assert not Path(temp_dir).exists()
    finally:
        if driver.poll() is None:
            driver.kill()
