"""``genpi serve``: the published adapters, and prompts without one, behind an OpenAI-compatible API.

Checks what it can first (on a local cluster: the port is free and the replicas fit; the model
and the store are reachable), each failure one line; then starts (or joins) Ray, runs
:func:`genpi.serve.application` on ``serve.host:serve.port``, logs the models it serves, and
serves until Ctrl-C or SIGTERM, then stops what it started. ``--check`` runs every published version's
parity check instead and exits (1 when one fails).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from genpi import registry
from genpi.cli.config_flags import add_flags, resolve
from genpi.cli.parser import Parser
from genpi.config import GenPIConfig
from genpi.devices import slow_bf16_warning
from genpi.engines.environments import serve_backend
from genpi.errors import GenPIError
from genpi.models import resolve_model
from genpi.prompt.files import load_prompts
from genpi.store import LocalStore, store_for

if TYPE_CHECKING:  # the server's modules load Ray Serve: imported when serving starts
    from genpi.serve.catalog import Catalog

HELP = "serve the published adapters (and prompts without one) over an OpenAI-compatible API"


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description=HELP)
    parser.add_argument(
        "--prompts",
        metavar="DIR",
        help="prompt folder: each prompt is served now, with the prompt "
        "prepended (prompt mode), until an adapter internalized from that text is published",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="check every published version (digests and parity probes) and exit; exit code 1 when one fails",
    )
    add_flags(parser, ("models.target", "serve", "store", "ray"))
    return parser


def check_published(cfg: GenPIConfig) -> int:
    """Print each published version's check, on the replicas' backend; 1 when one fails."""
    from genpi.serve.deployment import ParityChecker, Rejected, serving_engine

    store = store_for(cfg.store, existing=True)
    backend, runtime_env = serve_backend(cfg)
    if backend == "vllm":  # on vLLM itself, where a silent no-op would live: in its interpreter
        python = runtime_env.get("py_executable", sys.executable)
        quiet = {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR")}  # vLLM logs to stdout
        return subprocess.run(
            [python, "-m", "genpi.serve.vllm_check"],
            input=json.dumps(cfg.to_dict()),
            text=True,
            env={**os.environ, **quiet},
        ).returncode
    checker = None
    failed = 0
    for entry in registry.published(store):
        checker = checker or ParityChecker(cfg, serving_engine(cfg))
        with tempfile.TemporaryDirectory(prefix="genpi-check-") as tmp:
            try:
                folder = registry.download(store, entry, Path(tmp))
                outcome = checker.check(entry, folder)
            except (Rejected, registry.RegistryError) as e:
                outcome, failed = f"FAILED: {e}", failed + 1
        print(f"{entry.name}: {outcome}")
    if checker is None:
        print(f"no published adapters in {store.url}")
    return 1 if failed else 0


def check_port_free(host: str, port: int) -> None:
    """Refuse, in one line, a ``serve.host:serve.port`` this machine cannot listen on; Ray Serve's
    proxy would otherwise fail with a traceback after the cluster has started."""
    try:
        families = {info[0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
        for family in families:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds it
                s.bind((host, port))
    except OSError as e:
        raise GenPIError(
            f"serve.port {port} on serve.host {host!r} cannot be listened on ({e.strerror or e}): "
            "pick another with --serve.port N (or --serve.host), or stop what listens there"
        ) from None


def check_fits(cfg: GenPIConfig, resources: dict[str, float]) -> None:
    """Refuse replicas that a local cluster (which never grows) cannot place: they would wait for ever."""
    s = cfg.serve
    for kind, each, flag in (("CPU", s.num_cpus, "--serve.num-cpus"), ("GPU", s.num_gpus, "--serve.num-gpus")):
        need, have = each * s.replicas, resources.get(kind, 0.0)
        if need > have:
            raise GenPIError(
                f"serve.replicas {s.replicas} x serve.num_{kind.lower()}s {each:g} ask for {need:g} {kind} in all; "
                f"the local Ray cluster has {have:g}: lower {flag} or --serve.replicas"
            )


def served_now(catalog: Catalog) -> str:
    """One line for the log: the models a client can ask for now, by what answers them."""
    by_mode: dict[str, list[str]] = {}
    for card in catalog.cards():
        by_mode.setdefault(card.mode, []).append(card.id)
    if not by_mode:
        return (
            f"nothing to serve yet: no adapter is published in {catalog.store.url} and no --prompts were given; "
            f"a model appears within serve.refresh_s ({catalog.refresh_s:g} s) of its publication"
        )
    how = {"adapter": "its adapter", "prompt": "the prompt prepended", "unavailable": "refused, see GET /v1/models"}
    return "models: " + "; ".join(f"{', '.join(ids)} ({how.get(mode, mode)})" for mode, ids in sorted(by_mode.items()))


def execute(args: argparse.Namespace) -> int:
    cfg = resolve(args)
    if args.check:
        return check_published(cfg)
    specs = load_prompts(args.prompts) if args.prompts else []
    serve_backend(cfg)  # serve.backend vllm where vLLM is missing: one line, before Ray starts
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from genpi import ray_runtime

    local = not ray_runtime.cluster_address(cfg.ray)  # a cluster of this machine, serving here
    if local:
        warning = slow_bf16_warning({"target": cfg.models.target.dtype})
        if warning:  # every reply would be generated at a fraction of the speed
            print(f"genpi serve: {warning}", file=sys.stderr, flush=True)
        check_port_free(cfg.serve.host, cfg.serve.port)
    # An unknown model or an unreachable store: one line here, not a replica's traceback later.
    resolve_model(cfg.models.target.name)
    store = store_for(cfg.store)
    if isinstance(store, LocalStore) and not store.root.is_dir():  # a typo, or a job not run yet
        print(f"genpi serve: store folder {store.url} does not exist yet; check --store.url", file=sys.stderr)
    import ray
    from ray import serve

    from genpi.serve import application
    from genpi.serve.catalog import Catalog

    stop = threading.Event()
    connected = ray_runtime.connect(cfg.ray)
    try:
        # After Ray's start, which installs its own. An exception raised inside Ray's waits (Ctrl-C or
        # SIGTERM while starting) breaks them, so either signal sets an event: the server stops once up.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        print(connected, flush=True)
        if local:
            check_fits(cfg, ray.cluster_resources())
        serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
        try:
            serve.run(application(cfg, specs), name="genpi", route_prefix="/")
        except RuntimeError as e:  # a replica failed to start: its error is the cause
            raise GenPIError(f"the server did not start: {e}") from None
        url = f"http://{cfg.serve.host}:{cfg.serve.port}/v1"
        print(f"serving {store.url} at {url} (OpenAI API; GET {url}/models)", flush=True)
        print(served_now(Catalog(store, specs, cfg.models.target.name, cfg.serve.refresh_s)))
        print("ready; Ctrl-C stops", flush=True)
        stop.wait()
        print("stopping", flush=True)
    finally:
        serve.shutdown()
        ray_runtime.disconnect()
    return 0
