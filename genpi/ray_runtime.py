"""Start or join Ray, in one place.

With no address (flag, ``RAY_ADDRESS``, or the one ``ray job submit`` gives its driver), start
an embedded local cluster bound to 127.0.0.1 with a private temp folder; otherwise join.
The local cluster stops with :func:`disconnect`: this process stops what it started, nothing else.
"""

from __future__ import annotations

import logging
import os
import tempfile

import ray

from genpi.config import RayConfig

log = logging.getLogger(__name__)


def connect(cfg: RayConfig) -> str:
    """Join the configured cluster or start a local one; returns a line saying which."""
    if ray.is_initialized():
        return "using the Ray connection already open in this process"
    address = cfg.address or os.environ.get("RAY_ADDRESS", "")
    env_vars = {k: os.environ[k] for k in ("GENPI_CACHE", "HF_HUB_OFFLINE") if k in os.environ}
    runtime_env = {"env_vars": env_vars} if env_vars else None
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return f"joined the Ray cluster at {address}"
    # A cluster only this process uses: loopback only, no token to manage, its own temp folder.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    temp_dir = cfg.temp_dir or tempfile.mkdtemp(prefix="genpi-ray-")
    context = ray.init(
        num_cpus=cfg.num_cpus or None,
        include_dashboard=cfg.dashboard,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        _temp_dir=temp_dir,
        runtime_env=runtime_env,
        log_to_driver=True,
    )
    url = getattr(context, "dashboard_url", "")
    where = f" (dashboard on http://{url})" if cfg.dashboard and url else ""
    return f"started a local Ray cluster on 127.0.0.1{where}, temp folder {temp_dir}"


def disconnect() -> None:
    """Leave the cluster; a local cluster this process started stops with it."""
    if ray.is_initialized():
        ray.shutdown()
