"""The batch on local Ray clusters, on the tiny random model: two nodes against one, and the stage
graph against the barrier order (every prompt's synthesis, then every training, ...).

Each node is its own ``ray start`` (token auth, a private temp folder, its own ``--num-cpus``),
stopped by the process ids its marker finds (not Ray's own stop command, which ends every Ray
process on the machine). Engines, training runs and evaluation tasks each hold 1 CPU, so
synthesis and training hold different CPUs. Three batches of the same prompts, each on a fresh
store: graph on one node, barriers on one node, graph on two nodes. Prints each batch's wall
time, the driver's idle share and each stage's busy share (some unit in flight, waiting for
resources included); the last line is one JSON object.

Run it in a loopback-only namespace (``ray start`` listens on every interface)::

    unshare -n sh -c 'ip link set lo up; exec .venv/bin/python bench/batch.py'
"""

from __future__ import annotations

import os

# The driver's node address is 127.0.0.1 (read when Ray is imported; genpi sets the same).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import secrets  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TOKEN = secrets.token_hex(32)
os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN)  # the driver's, read when Ray is imported

from genpi import ray_runtime, reaper  # noqa: E402
from genpi.batch.graph import run_batch  # noqa: E402
from genpi.batch.timeline import Timeline  # noqa: E402
from genpi.config import load_config  # noqa: E402
from genpi.prompt.files import load_prompts  # noqa: E402
from genpi.store import open_store  # noqa: E402
from tests.batch.command import TINY_CONFIG  # noqa: E402

# The tests' tiny sizes; engines, training runs and evaluation tasks each hold 1 CPU; 8 steps of 2 records a run.
TINY = {
    **TINY_CONFIG,
    "models.generator.num_cpus": 1,
    "models.target.num_cpus": 1,
    "train.min_steps": 8,
    "train.batch_size": 2,
    "train.micro_batch_size": 1,
    "train.num_cpus": 1,
    "eval.num_cpus": 1,
}


def write_prompts(folder: Path, count: int) -> Path:
    """``count`` prompts: the shipped ones in turn, each under a name of its own."""
    folder.mkdir(parents=True)
    shipped = sorted(p for p in (ROOT / "prompts").iterdir() if p.name != "README.md")
    for k in range(count):
        source = shipped[k % len(shipped)]
        text = re.sub(r'^(\s*"?name"?:\s*"?)([\w-]+)', rf"\g<1>\g<2>-{k}", source.read_text(), count=1, flags=re.M)
        (folder / f"{source.stem}-{k}{source.suffix}").write_text(text)
    return folder


@contextmanager
def cluster(node_cpus: list[int], temp: Path) -> Iterator[str]:
    """A Ray cluster of one node per entry of ``node_cpus``; yields the head's address."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    marker = secrets.token_hex(16)
    folder = Path(tempfile.mkdtemp(prefix="r", dir=temp))  # short: socket paths stay under 108 characters
    env = {
        **os.environ,
        reaper.MARKER_VAR: marker,
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
        "HF_HUB_OFFLINE": "1",
        "TMPDIR": str(folder),
        # 0 turns multi-node clusters off on Linux too: `ray start --address` would abort
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
    }
    port = ray_runtime.free_port()
    address = f"127.0.0.1:{port}"
    common = ["--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    head = ["--head", "--port", str(port), "--temp-dir", str(folder), "--include-dashboard", "false"]
    try:
        for k, cpus in enumerate(node_cpus):
            where = head if k == 0 else ["--address", address]
            started = subprocess.run(
                [ray_bin, "start", *where, *common, "--num-cpus", str(cpus)],
                env=env,
                capture_output=True,
                text=True,
                timeout=180,
            )
            if started.returncode:
                lines = [line for line in (started.stdout + started.stderr).splitlines() if line.strip()]
                raise SystemExit(f"ray start of node {k + 1} failed: {lines[-1] if lines else started.returncode}")
        yield address
    finally:
        reaper.stop_cluster(marker, skip={os.getpid()})
        shutil.rmtree(folder, ignore_errors=True)


def run_once(label: str, node_cpus: list[int], order: str, prompts: Path, temp: Path) -> tuple[float, Timeline]:
    """One batch on a fresh store and a fresh cluster; returns its wall time and timeline."""
    import ray

    store = open_store(str(Path(tempfile.mkdtemp(prefix="store-", dir=temp))))
    cfg = load_config("local", overrides={**TINY, "store.url": store.url})
    specs = load_prompts(prompts)
    with cluster(node_cpus, temp) as address:
        ray.init(address=address, log_to_driver=False)
        try:
            timeline = Timeline()
            results = run_batch(specs, cfg, store, order=order, timeline=timeline)
        finally:
            ray.shutdown()
    failed = [f"{r.name}: {r.error}" for r in results if r.status == "failed"]
    if failed:
        raise SystemExit(f"{label}: {len(failed)} prompts failed: {failed[0]}")
    busy = ", ".join(f"{stage} {share:.0%}" for stage, share in timeline.busy_shares().items())
    print(
        f"{label}: {timeline.seconds:.1f} s; driver idle {timeline.driver_idle_share():.0%}; busy: {busy}",
        flush=True,
    )
    return timeline.seconds, timeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8, help="prompts in the batch (default 8)")
    parser.add_argument("--node-cpus", type=int, default=2, help="logical CPUs of each Ray node (default 2)")
    args = parser.parse_args()
    if args.prompts < 1 or args.node_cpus < 2:
        parser.error("--prompts must be at least 1 and --node-cpus at least 2 (engines and training hold one each)")
    import logging

    logging.basicConfig(level=logging.WARNING)
    temp = Path(tempfile.mkdtemp(prefix="gb-", dir="/tmp"))
    try:
        prompts = write_prompts(temp / "prompts", args.prompts)
        print(f"{args.prompts} prompts, tiny-random-llama; nodes of {args.node_cpus} CPUs; {os.cpu_count()} cores")
        one, _ = run_once("graph, one node", [args.node_cpus], "graph", prompts, temp)
        barriers, _ = run_once("barriers, one node", [args.node_cpus], "barriers", prompts, temp)
        two, _ = run_once("graph, two nodes", [args.node_cpus] * 2, "graph", prompts, temp)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    print(
        json.dumps(
            {
                "two_nodes_speedup": round(one / two, 2),
                "graph_vs_barriers": round(barriers / one, 2),
                "seconds": {
                    "graph_one_node": round(one, 1),
                    "barriers_one_node": round(barriers, 1),
                    "graph_two_nodes": round(two, 1),
                },
                "prompts": args.prompts,
                "node_cpus": args.node_cpus,
                "machine_cores": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
