"""The submit path as a user takes it: a private two-node Ray cluster on 127.0.0.1 with token auth,
``ray job submit --working-dir .`` of ``jobs/internalize.py``, the store on S3 with the endpoint only
in ``AWS_ENDPOINT_URL``; training lands on the second node and nothing is written in Ray's folders."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from genpi import ray_runtime
from tests.batch.command import TINY_RUN
from tests.repo import ROOT
from tests.s3_server import S3Server

pytestmark = [pytest.mark.s3, pytest.mark.slow, pytest.mark.timeout(900)]
RAY = str(Path(sys.executable).parent / "ray")
ARTIFACT_NAMES = {"_SUCCESS", "records.jsonl", "adapter_model.safetensors", "manifest.json", "state.pt"}


class Cluster:
    """``ray start --block`` processes (head, then one worker node), each stopped by its PID."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env, self.nodes = root, env, []
        self.port, self.dashboard = ray_runtime.free_port(), ray_runtime.free_port()
        self.agent_ports: set[int] = {self.port, self.dashboard}

    def agent_port(self) -> str:
        """A ``--dashboard-agent-listen-port`` of its own for a node. Every node's agent otherwise
        binds 52365: when the second node's agent got there before the head's (slow to start on 2
        cores), the head's agent ran without its HTTP server and never registered, and Ray refused
        every job ("No available agent to submit job") while the cluster stayed up."""
        port = next(p for p in iter(ray_runtime.free_port, None) if p not in self.agent_ports)
        self.agent_ports.add(port)
        return f"--dashboard-agent-listen-port={port}"

    def start(self, *args: str) -> psutil.Process:
        log = (self.root / f"node-{len(self.nodes)}.log").open("w")
        node = subprocess.Popen([RAY, "start", "--block", *args], env=self.env, stdout=log, stderr=log, cwd=self.root)
        self.nodes.append(node)
        return psutil.Process(node.pid)

    def stop(self) -> None:
        for node in reversed(self.nodes):  # --block: the ray start process stops its node's processes
            node.terminate()
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait(timeout=30)


@pytest.fixture
def cluster(s3_env: S3Server, aws_env: pytest.MonkeyPatch) -> Iterator[Cluster]:
    root = Path(tempfile.mkdtemp(prefix="gs-", dir="/tmp"))  # Ray's socket paths must stay short
    aws_env.setenv("AWS_ENDPOINT_URL", s3_env.endpoint_url)  # the S3 server, for the nodes and this test alike
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        # importing genpi sets this to 0 for one-node clusters; a second node refuses to join under it
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # the entrypoint's `python`
    )
    env.pop("PYTHONPATH", None)  # the job imports genpi from its working dir, as on a real cluster
    nodes = Cluster(root, env)
    try:
        yield nodes
    finally:
        nodes.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_ray_job_submit_on_two_nodes_with_the_store_on_s3(cluster: Cluster, s3_env: S3Server) -> None:
    from genpi import registry
    from genpi.store import open_store

    temp = cluster.root / "ray"
    cluster.start(
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={cluster.port}",
        f"--dashboard-port={cluster.dashboard}",
        "--dashboard-host=127.0.0.1",
        f"--temp-dir={temp}",
        "--num-cpus=2",  # the engines; training asks for 3 CPUs and fits only the second node
        cluster.agent_port(),
    )
    address = f"http://127.0.0.1:{cluster.dashboard}"
    deadline = time.monotonic() + 120
    while subprocess.run([RAY, "job", "list", "--address", address], env=cluster.env, capture_output=True).returncode:
        assert time.monotonic() < deadline, (cluster.root / "node-0.log").read_text()[-3000:]
        time.sleep(1)
    # its own temp folder: two nodes of one machine sharing one would unpack the job's working dir over
    # each other (the driver's own folder deleted under it)
    second = cluster.start(
        f"--address=127.0.0.1:{cluster.port}",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=3",
        f"--temp-dir={temp}-2",
        cluster.agent_port(),
    )
    # joined before the job starts: the job sizes its training tasks by the cluster it finds
    log = cluster.root / "node-1.log"
    deadline = time.monotonic() + 120
    while "Ray runtime started" not in log.read_text():
        assert second.is_running() and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(1)

    seen: set[str] = set()
    stop = threading.Event()

    def watch_second_node() -> None:  # the process titles of Ray's workers on the second node
        while not stop.wait(0.2):
            for process in second.children(recursive=True):
                try:
                    seen.add((process.cmdline() or [""])[0])
                except psutil.Error:
                    continue

    watcher = threading.Thread(target=watch_second_node, daemon=True)
    watcher.start()
    bucket = s3_env.create_bucket()
    url = f"s3://{bucket}/genpi"
    runtime_env = {"excludes": [".venv", ".venv-vllm", ".git", "artifacts"]}
    command = (
        [
            RAY,
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            ".",
            "--runtime-env-json",
            json.dumps(runtime_env),
        ]
        + ["--", "python", "jobs/internalize.py", "--prompts", "prompts/", "--only", "shell-agent"]
        + ["--store.url", url, *TINY_RUN, "--train.num-cpus", "3", "--eval.num-cpus", "1"]
    )
    # The head's dashboard agent can still be starting: Ray then refuses the job, and says to retry. On
    # a slow 2-core VM it took more than a minute after `ray job list` first answered.
    deadline = time.monotonic() + 240
    while True:
        job = subprocess.run(command, cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=800)
        refused = job.returncode and "No available agent to submit job" in job.stdout + job.stderr
        if not refused or time.monotonic() > deadline:
            break
        time.sleep(2)
    stop.set()
    watcher.join(timeout=5)
    out = job.stdout + job.stderr
    # Were the job refused to the end, the head's agent log says why.
    agent_log = temp / "session_latest" / "logs" / "dashboard_agent.log"
    agent = agent_log.read_text(errors="replace")[-3000:] if agent_log.is_file() else "(no agent log)"
    assert job.returncode == 0, out[-5000:] + "\n--- the head's dashboard agent:\n" + agent
    assert "joined the Ray cluster" in out and "succeeded" in out
    assert any(title.startswith("ray::RayTrainWorker") for title in seen), sorted(seen)

    store = open_store(url)  # the endpoint only in the environment
    (batch,) = {k.split("/")[1] for k in store.list_keys("batches")}
    (result,) = store.get_json(f"batches/{batch}/manifest.json")["prompts"]
    assert result["name"] == "shell-agent" and result["status"] == "done", result
    assert store.exists(f"{result['artifacts']['adapter'].split(bucket + '/genpi/', 1)[1]}/adapter_model.safetensors")
    published = {entry.prompt for entry in registry.published(store)}
    assert published == ({"shell-agent"} if result["published"] else set())
    assert not [k for k in store.list_keys("prompts") if "/ray/" in k or ".lease" in k]
    leaked = [
        p
        for t in (temp, Path(f"{temp}-2"))
        for p in t.rglob("*")
        if p.name in ARTIFACT_NAMES or (p.name == "artifacts" and "runtime_resources" in p.parts)
    ]
    assert not leaked, leaked[:5]  # nothing of the store in Ray's folders, its copies of the working dir included
