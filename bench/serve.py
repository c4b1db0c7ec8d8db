"""Serving speed: the app over HTTP with the stock ``openai`` client, adapters against the prompt (a benchmark).

One run, on the embedded model and the adapters a ``make run`` published. The store is copied to a
temp folder (the original is only read), where the bench adds what it needs: a second name for the
prompt given as a prompt file (``<prompt>-prompt``: the same text served in prompt mode, the
base model reading it with its KV computed once and shared: the fair "prefix-cached prompt"),
a copy of the prompt's adapter under another name (a fourth adapter, when the run published three),
and later a new version (hot publish). It starts ``genpi serve`` on that copy, measures, stops it.

- ``concurrent_vs_prompt``: 16 concurrent 5-turn conversations on one prompt, completion tokens
  per second, adapter / prompt mode;
- ``batch1_vs_cached``, ``batch1_vs_recompute``: one conversation at a time (three a mode, the
  best kept), seconds per completion token over turns 2-5 (each turn's prefill included; the modes' replies differ in length), adapter /
  prompt mode, and adapter / the engine's own time with the prompt recomputed every turn;
- ``mixed_vs_single``: 16 clients over 4 adapters / 16 clients on one adapter, tokens per second;
- ``http_overhead``: the adapter's batch-1 turns over HTTP / the same requests on an engine in
  this process (the best of the three conversations) (same model, dtype, threads, adapter, turn cache);
- ``hot_publish_s``: seconds from a new version's manifest being written to its first answer.

``--backend vllm`` measures the vLLM model replica (``serve.backend vllm``) instead; the figures
that need an engine in this process (``batch1_vs_recompute``, ``http_overhead``) are then left
out (null): that engine is the hf one, and vLLM does not import here.

Replies are greedy with ``max_tokens`` 32; a reply may end sooner (its end of turn), so the token
counts are reported beside each figure. Run it in a loopback-only namespace::

    unshare -n sh -c 'ip link set lo up; .venv/bin/python bench/serve.py --store.url artifacts'

Each phase prints a line as it ends (to stderr); the last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genpi import ray_runtime, registry  # noqa: E402
from genpi.store import open_store  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OBSERVATIONS = [
    "Output:\n3 files, 12 KB",
    "Output:\nPermission denied",
    "Output:\n(no output)",
    "Output:\ndone",
    "Output:\n42",
]


def copy_store(source: str, target: Path) -> None:
    """The registry (all the server reads: versions and prompt texts) of a local store."""
    shutil.copytree(Path(source) / "adapters", target / "adapters")


def republish(store: Any, entry: registry.PublishedAdapter, prompt: str, version: str) -> registry.PublishedAdapter:
    """``entry``'s files under another name or version (the same weights)."""
    source = f"bench/{prompt}/{version}/adapter"
    for name in entry.files:
        store.put_bytes(f"{source}/{name}", store.get_bytes(f"{entry.prefix}/{name}"))
    copy = dataclasses.replace(entry, prompt=prompt, version=version, files={}, published_at="")
    return registry.publish(store, source, copy)


def start_server(store: Path, prompts: Path, port: int, extra: list[str]) -> subprocess.Popen:
    log = open(store.parent / "serve.log", "w")
    cmd = [
        sys.executable,
        "-m",
        "genpi.cli",
        "serve",
        "--store.url",
        str(store),
        "--prompts",
        str(prompts),
        "--serve.port",
        str(port),
        "--ray.dashboard",
        "false",
        *extra,
    ]
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    deadline = time.monotonic() + 600  # a vLLM replica starts in minutes on 2 busy cores
    while time.monotonic() < deadline:
        text = (store.parent / "serve.log").read_text()
        if "\nready" in text:
            return proc
        if proc.poll() is not None:
            raise SystemExit(f"genpi serve exited:\n{text[-3000:]}")
        time.sleep(1)
    proc.terminate()
    raise SystemExit("genpi serve did not get ready in 600 s")


def conversation_turns(client: Any, model: str, first: str, turns: int, tokens: int) -> list[dict[str, Any]]:
    """One conversation, turn by turn: each turn's seconds, completion tokens and messages sent."""
    messages: list[dict[str, str]] = []
    out = []
    for t in range(turns):
        messages.append({"role": "user", "content": first if t == 0 else OBSERVATIONS[t % len(OBSERVATIONS)]})
        started = time.perf_counter()
        reply = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=tokens)
        seconds = time.perf_counter() - started
        out.append(
            {
                "seconds": seconds,
                "tokens": reply.usage.completion_tokens,
                "messages": list(messages),
                "mode": reply.model_extra.get("genpi_mode"),
            }
        )
        messages.append({"role": "assistant", "content": reply.choices[0].message.content})
    return out


def concurrent(client: Any, models: list[str], inputs: list[str], turns: int, tokens: int) -> dict[str, Any]:
    """Client k holds a ``turns``-turn conversation with ``models[k % len(models)]``; all start together."""
    results: list[list[dict] | BaseException] = [[] for _ in inputs]
    barrier = threading.Barrier(len(inputs))

    def run(k: int) -> None:
        barrier.wait()
        try:
            results[k] = conversation_turns(client, models[k % len(models)], inputs[k], turns, tokens)
        except BaseException as e:  # reported below
            results[k] = e

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(inputs))]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    done = [turn for r in results if not isinstance(r, BaseException) for turn in r]
    total = sum(turn["tokens"] for turn in done)
    return {
        "wall_s": round(wall, 2),
        "tokens": total,
        "tokens_per_s": round(total / wall, 2),
        "errors": errors,
        "modes": sorted({turn["mode"] for turn in done}),
    }


def engine_turns(
    engine: Any, adapter: str | None, transcript: list[dict[str, Any]], prefix: list[dict[str, str]], tokens: int
) -> list[dict[str, Any]]:
    """Seconds and completion tokens per turn of the same requests on an engine in this process
    (``prefix``: the prompt's turns)."""
    from genpi.engines.base import SamplingParams

    params = SamplingParams(max_new_tokens=tokens, temperature=0.0)
    out = []
    for turn in transcript:
        started = time.perf_counter()
        gen = engine.generate([prefix + turn["messages"]], params, [adapter])[0]
        out.append({"seconds": time.perf_counter() - started, "tokens": gen.output_tokens})
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a / b, 3)


def phase(name: str, figures: dict[str, Any]) -> dict[str, Any]:
    print(f"{name}: {json.dumps(figures)}", file=sys.stderr, flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store.url", dest="store", default="artifacts", help="the store a make run left (read only)")
    parser.add_argument("--prompt", default="shell-agent", help="the prompt measured")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=32, help="max_tokens of each reply")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server's replica and this engine")
    parser.add_argument("--backend", choices=("hf", "vllm"), default="hf", help="the model replicas' engine")
    parser.add_argument("--serve-args", default="", help="more genpi serve flags, e.g. '--serve.batch-window-ms 20'")
    args = parser.parse_args()
    import openai
    import torch

    from genpi.engines.hf import HFEngine

    work = Path(tempfile.mkdtemp(prefix="genpi-bench-serve-"))
    store_dir = work / "store"
    copy_store(args.store, store_dir)
    store = open_store(str(store_dir))
    published = registry.published(store)
    entry = registry.resolve(store, args.prompt)
    names = [args.prompt] + sorted({e.prompt for e in published} - {args.prompt})
    copies = 0
    while len(names) < 4:  # a fourth adapter: the same weights under another name
        copies += 1
        names.append(republish(store, entry, f"{args.prompt}-copy{copies}", entry.version).prompt)
    spec = registry.prompt_texts(store).get(args.prompt, {}).get(entry.prompt_hash)
    if spec is None:
        sys.exit(f"{args.store} holds no text of {args.prompt}; run the job on that store again (it records it)")
    prompt_dir = work / "prompts"
    prompt_dir.mkdir()
    fallback_name = f"{args.prompt}-prompt"
    (prompt_dir / f"{fallback_name}.json").write_text(
        json.dumps({"name": fallback_name, "turns": [{"role": t.role, "content": t.content} for t in spec.turns]})
    )
    inputs = [
        json.loads(line)["input"]
        for line in (ROOT / "inputs" / f"{args.prompt}.jsonl").read_text().splitlines()
        if line.strip()
    ]
    inputs = [inputs[k % len(inputs)] for k in range(args.clients)]

    port = ray_runtime.free_port()
    extra = [
        "--models.target.name",
        entry.base_model,
        "--serve.num-cpus",
        str(args.threads),
        "--models.target.threads",
        str(args.threads),
        "--serve.backend",
        args.backend,
        *args.serve_args.split(),
    ]
    server = start_server(store_dir, prompt_dir, port, extra)
    result: dict[str, Any] = {}
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
        for name in names + [fallback_name]:  # load every adapter and the prompt's KV once
            client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=1)

        # batch 1: turns 2.. of one conversation, three conversations a mode (alternating), the best of each
        adapter_runs, prompt_runs = [], []
        for first in inputs[:3]:
            adapter_runs.append(conversation_turns(client, args.prompt, first, args.turns, args.tokens))
            prompt_runs.append(conversation_turns(client, fallback_name, first, args.turns, args.tokens))
        own_runs: list[list[dict[str, Any]]] = []
        recompute_runs: list[list[dict[str, Any]]] = []
        if args.backend == "hf":
            torch.set_num_threads(args.threads)
            engine = HFEngine(  # the server's adapter path: a batch of one adapter on merged weights
                entry.base_model, dtype="bfloat16", threads=args.threads, batch_size=args.clients, max_merged=1
            )
            folder = registry.download(store, entry, work / "adapter")
            name = engine.add_adapter(folder)
            engine_turns(engine, name, adapter_runs[0][:1], [], args.tokens)  # warm
            own_runs = [engine_turns(engine, name, turns, [], args.tokens) for turns in adapter_runs]
            engine.turn_cache.max_bytes, engine.prefix_sharing = 0, False  # the prompt recomputed every turn
            prompt_messages = [{"role": t.role, "content": t.content} for t in spec.turns]
            recompute_runs = [engine_turns(engine, None, turns, prompt_messages, args.tokens) for turns in prompt_runs]
            del engine

        def per_token(runs: list[list[dict[str, Any]]]) -> float | None:
            """Seconds per completion token of turns 2.. (replies differ in length between modes), best run."""
            if not runs:
                return None
            return min(
                sum(t["seconds"] for t in turns[1:]) / max(1, sum(t["tokens"] for t in turns[1:])) for turns in runs
            )

        http_vs_engine = min(
            (
                sum(t["seconds"] for t in http) / sum(t["seconds"] for t in own)
                for http, own in zip(adapter_runs, own_runs)
            ),
            default=None,
        )
        batch1 = {
            "adapter_s_per_token": per_token(adapter_runs),
            "prompt_cached_s_per_token": per_token(prompt_runs),
            "prompt_recomputed_s_per_token": per_token(recompute_runs),
            "adapter_engine_s_per_token": per_token(own_runs),
            "adapter_tokens": [[t["tokens"] for t in turns] for turns in adapter_runs],
            "prompt_tokens": [[t["tokens"] for t in turns] for turns in prompt_runs],
        }

        # concurrency: one prompt, adapter vs prompt mode; then four adapters
        phase("batch1", batch1)
        single = phase("single_adapter", concurrent(client, [args.prompt], inputs, args.turns, args.tokens))
        prompted = phase("prompt_mode", concurrent(client, [fallback_name], inputs, args.turns, args.tokens))
        mixed = phase("four_adapters", concurrent(client, names[:4], inputs, args.turns, args.tokens))

        # hot publish: a new version of the prompt, answered without a restart
        republish(store, entry, args.prompt, "hot")
        published_at = time.perf_counter()
        hot_s = None
        while time.perf_counter() - published_at < 60:
            reply = client.chat.completions.create(
                model=args.prompt, messages=[{"role": "user", "content": "hi"}], max_tokens=1
            )
            if reply.system_fingerprint == f"{args.prompt}@hot":
                hot_s = round(time.perf_counter() - published_at, 2)
                break
            time.sleep(0.1)
        result = {
            "concurrent_vs_prompt": round(single["tokens_per_s"] / prompted["tokens_per_s"], 3),
            "batch1_vs_cached": _ratio(batch1["adapter_s_per_token"], batch1["prompt_cached_s_per_token"]),
            "batch1_vs_recompute": _ratio(batch1["adapter_s_per_token"], batch1["prompt_recomputed_s_per_token"]),
            "mixed_vs_single": round(mixed["tokens_per_s"] / single["tokens_per_s"], 3),
            "http_overhead": None if http_vs_engine is None else round(http_vs_engine, 3),
            "hot_publish_s": hot_s,
            "detail": {
                "batch1": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in batch1.items()},
                "single_adapter": single,
                "prompt_mode": prompted,
                "four_adapters": mixed,
                "adapters": names[:4],
                "prompt": args.prompt,
                "clients": args.clients,
                "turns": args.turns,
                "max_tokens": args.tokens,
                "threads": args.threads,
                "backend": args.backend,
                "model": entry.base_model,
                "cpu": os.cpu_count(),
            },
        }
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
