"""Start or join Ray, in one place.

With no address (flag, ``RAY_ADDRESS``, or the one ``ray job submit`` gives its driver), start
an embedded local cluster bound to 127.0.0.1 with a private temp folder; otherwise join.

A local cluster runs with Ray's token auth and a random token of this process's own, so no other
process on the machine can submit work to it (the dashboard's Jobs API included), and its
dashboard listens on 127.0.0.1 only (``ray.dashboard false`` turns it off). A watchdog
(:mod:`genpi.reaper`) stops the cluster's processes and removes its temp folder when this process
ends, however it ends; :func:`disconnect` does the same at once.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import ray

from genpi import reaper
from genpi.config import RayConfig
from genpi.errors import ConfigError, GenPIError

# The token of the local clusters this process starts; Ray's token loader caches one per process.
_TOKEN = secrets.token_hex(32)
_reaper: subprocess.Popen | None = None


def cluster_address(cfg: RayConfig) -> str:
    """The cluster :func:`connect` joins (the flag, else ``RAY_ADDRESS``); empty: it starts a local one."""
    return cfg.address or os.environ.get("RAY_ADDRESS", "")


def connect(cfg: RayConfig) -> str:
    """Join the configured cluster or start a local one; returns a line saying which."""
    global _reaper
    if ray.is_initialized():
        return "using the Ray connection already open in this process"
    address = cluster_address(cfg)
    env_vars = {k: os.environ[k] for k in ("GENPI_CACHE", "HF_HUB_OFFLINE") if k in os.environ}
    if address:
        check_reachable(address)
        ray.init(address=address, runtime_env={"env_vars": env_vars} if env_vars else None, log_to_driver=True)
        return f"joined the Ray cluster at {address}"
    temp_dir = cfg.temp_dir or tempfile.mkdtemp(prefix="genpi-ray-")
    # Workers' temp files go inside the cluster's folder, so they go with it even when a worker is killed.
    scratch = Path(temp_dir) / "tmp"
    try:
        scratch.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"ray.temp_dir {temp_dir} cannot be created ({e.strerror or e}); pass a writable folder"
        ) from None
    env_vars["TMPDIR"] = str(scratch)
    marker = secrets.token_hex(16)
    _reaper = subprocess.Popen(
        [sys.executable, reaper.__file__, marker, str(os.getpid()), temp_dir, "0" if cfg.temp_dir else "1"],
        stdin=subprocess.PIPE,
        start_new_session=True,
        cwd="/",
        env={k: v for k, v in os.environ.items() if k != reaper.MARKER_VAR},
    )
    os.environ.update({reaper.MARKER_VAR: marker, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": _TOKEN})
    # Ray read its auth mode when it was imported: make it read the environment again (as ray.init
    # does itself when it turns token auth on by default).
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    try:
        context = ray.init(
            num_cpus=cfg.num_cpus or None,
            include_dashboard=cfg.dashboard,
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",
            _temp_dir=temp_dir,
            runtime_env={"env_vars": env_vars, **({} if cfg.dashboard else {"worker_process_setup_hook": _QUIET})},
            log_to_driver=True,
        )
    except BaseException:
        disconnect()
        raise
    url = getattr(context, "dashboard_url", "")
    where = f" (dashboard on http://{url}, token auth)" if cfg.dashboard and url else ""
    return f"started a local Ray cluster on 127.0.0.1{where}, temp folder {temp_dir}"


def quiet_without_state_api() -> None:
    """A worker's setup on a local cluster without its dashboard: Ray Train's placement-group
    cleaner asks the state API (which the dashboard serves) about its run every few seconds and
    logs each failure, some twenty lines every five seconds of the job log while runs train."""
    logging.getLogger(_CLEANER).setLevel(logging.ERROR)


_CLEANER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
_QUIET = f"{__name__}.{quiet_without_state_api.__name__}"


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """A ConfigError unless ``address`` (``host:port``, ``ray://host:port`` or ``auto``) names a
    port that accepts a connection: Ray itself retries an address nobody listens on for minutes."""
    if address == "auto":
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"Ray address {address!r} (--ray.address or RAY_ADDRESS) is not host:port, ray://host:port or auto"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise GenPIError(
            f"cannot reach the Ray cluster at {address} ({e.strerror or e}); check --ray.address or "
            "RAY_ADDRESS, or leave both empty to start a local cluster"
        ) from None


# Ray's workers take ports in 10002-19999 (its default --min/--max-worker-port); its other servers,
# like every outgoing connection, take theirs from the kernel's ephemeral range.
_ABOVE_RAY_WORKERS = 20000


def server_ports() -> tuple[int, int]:
    """The ports (low, high: high excluded) for servers started beside Ray: above its workers'
    range, below the kernel's ephemeral range, so that none of Ray's processes takes one first."""
    try:
        ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    return _ABOVE_RAY_WORKERS, max(ephemeral, _ABOVE_RAY_WORKERS + 1000)


def free_port(host: str = "127.0.0.1") -> int:
    """A free TCP port on ``host`` for a server started after Ray: one none of Ray's processes will
    take. (Binding port 0 hands out an ephemeral port that a Ray process can take before the server
    binds it: "Failed to bind to address".)"""
    low, high = server_ports()
    for _ in range(1000):
        port = random.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port on {host} in {low}-{high - 1}")


def auth_token() -> str:
    """The token a client needs for this process's local cluster (``Authorization: Bearer ...``)."""
    return _TOKEN


def disconnect() -> None:
    """Leave the cluster; a local cluster this process started stops with it, its temp folder removed."""
    global _reaper
    if ray.is_initialized():
        ray.shutdown()
    if _reaper is not None:
        _reaper.stdin.close()  # the watchdog stops what is left of the cluster
        _reaper.wait(timeout=60)
        _reaper = None
        os.environ.pop(reaper.MARKER_VAR, None)
