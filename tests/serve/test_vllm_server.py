"""The app with ``serve.backend vllm`` on the embedded model, driven with the stock ``openai`` client.

One private Ray cluster and one app for the module; the model replica runs vLLM's async engine on
the vLLM interpreter (``.venv-vllm`` on CPU), in float32, where vLLM and the hf engine decode the
same tokens (vLLM's CPU attention has no kernel for the tiny model's head size 16). The ingress is
the same as the hf server's (``test_server.py`` covers its validation, errors and auth), so these
tests cover what the replica does: streaming, adapters per request in one running batch, prompt
mode on vLLM's prefix cache, the parity check on vLLM itself, and eviction out of vLLM.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest

from genpi import ray_runtime
from genpi.engines.environments import vllm_python
from genpi.models import EMBEDDED
from genpi.store import open_store
from tests.serve.support import (
    HELLO,
    KEY,
    ask,
    probe_engine,
    prompt_spec,
    publish,
    random_adapter,
    replica_stats,
    serve_config,
    start_app,
    streamed_as_whole,
    two_published,
    wait_for,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1500),  # the first test starts the app: minutes on 2 busy cores
    pytest.mark.skipif(vllm_python() is None, reason="vLLM is not installed: run `make install-vllm`"),
]

SHELL, NEW = prompt_spec("shell-agent"), prompt_spec("deploy-now")


def adapter(folder: Path, seed: int, **kw) -> Path:
    return random_adapter(folder, seed, model=EMBEDDED, **kw)


def put(store, spec, version: str, folder: Path, **kw):
    return publish(store, spec, version, folder, model=EMBEDDED, **kw)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return two_published(tmp_path_factory.mktemp("vllm-serve"), EMBEDDED)


@pytest.fixture(scope="module")
def client(store_dir: Path):
    cfg = serve_config(
        str(store_dir / "store"),
        ray_runtime.free_port(),
        **{
            "serve.api_key": KEY,
            "serve.backend": "vllm",
            "serve.num_cpus": 2,
            "models.target.name": EMBEDDED,
            "models.target.max_context": 2048,
            "models.target.kv_cache_gb": 1,
        },
    )
    for base_url in start_app(cfg, [NEW]):
        yield openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=300)


def text(client: openai.OpenAI, model: str, messages=HELLO, **kw) -> str:
    return ask(client, model, messages, **kw).parse().choices[0].message.content


def hf_answer(folder: Path, messages: list[dict[str, str]], tokens: int) -> str:
    """The hf engine's float32 greedy answer with the adapter in ``folder``."""
    from genpi.engines.base import SamplingParams

    engine = probe_engine(EMBEDDED)
    name = engine.add_adapter(folder)
    try:
        return engine.generate([messages], SamplingParams(max_new_tokens=tokens), [name])[0].text
    finally:
        engine.remove_adapter(name)


def test_adapters_answer_as_the_hf_engine_does_with_usage_and_parity(store_dir: Path, client: openai.OpenAI) -> None:
    raw = ask(client, "shell-agent")
    reply = raw.parse()
    assert raw.headers["x-genpi-mode"] == "adapter" and reply.system_fingerprint == "shell-agent@v1"
    usage = reply.usage.model_dump()
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 12
    assert usage["prompt_tokens_saved"] > 100
    shell, sql = reply.choices[0].message.content, text(client, "sql-agent")
    assert shell != sql
    assert shell == hf_answer(store_dir / "shell", HELLO, 12)
    assert sql == hf_answer(store_dir / "sql", HELLO, 12)
    card = next(m for m in client.models.list().data if m.id == "shell-agent").model_dump()
    assert card["parity"] == "passed"


def test_streaming_equals_the_whole_reply_token_by_token(client: openai.OpenAI) -> None:
    assert len(streamed_as_whole(client, "sql-agent")) > 1
    assert len(streamed_as_whole(client, "deploy-now")) > 1


def test_stop_strings_and_seeded_sampling(client: openai.OpenAI) -> None:
    whole = text(client, "shell-agent", max_tokens=16)
    cut = whole.split()[2]
    stopped = text(client, "shell-agent", max_tokens=16, stop=[cut])
    assert stopped == whole[: whole.index(cut)].strip()
    sampled = [text(client, "shell-agent", temperature=1.0, seed=7, max_tokens=16) for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_concurrent_mixed_adapters_equal_single_answers(client: openai.OpenAI) -> None:
    requests = [
        (m, [{"role": "user", "content": f"task {k}"}])
        for k, m in enumerate(["shell-agent", "sql-agent", "deploy-now"] * 2)
    ]
    alone = [text(client, m, msgs) for m, msgs in requests]
    together: list[str | None] = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def run(k: int) -> None:
        barrier.wait()
        together[k] = text(client, *requests[k])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


def test_prompt_mode_reads_the_prompt_from_the_cache_then_the_adapter_once_published(
    store_dir: Path, client: openai.OpenAI
) -> None:
    raw = ask(client, "deploy-now")
    reply = raw.parse()
    assert raw.headers["x-genpi-mode"] == "prompt" and reply.usage.prompt_tokens > 100
    assert reply.usage.prompt_tokens_details.cached_tokens > 0  # vLLM's prefix cache: the prompt held
    put(open_store(str(store_dir / "store")), NEW, "v1", adapter(store_dir / "new", seed=3))
    assert wait_for(lambda: ask(client, "deploy-now").headers["x-genpi-mode"] == "adapter", timeout=30)


def test_parity_check_on_vllm_refuses_tampered_inert_and_too_large_versions(
    store_dir: Path, client: openai.OpenAI
) -> None:
    store = open_store(str(store_dir / "store"))
    good = text(client, "shell-agent@v1")
    # probes recorded from another adapter than the one published
    put(store, SHELL, "v2", adapter(store_dir / "shell2", seed=5), probes_from=store_dir / "sql")
    time.sleep(0.6)
    with pytest.raises(openai.InternalServerError) as refused:
        ask(client, "shell-agent@v2")
    assert "parity check failed" in refused.value.body["message"]
    # lora_B zeroed: vLLM loads it and it changes nothing (its probes are the base model's answers)
    put(store, SHELL, "v3", adapter(store_dir / "inert", seed=6, zero=True))
    with pytest.raises(openai.InternalServerError) as inert:
        ask(client, "shell-agent@v3")
    assert "changes nothing" in inert.value.body["message"]
    # rank 32 over the engine's max_lora_rank (16)
    put(store, SHELL, "v4", adapter(store_dir / "wide", seed=7, rank=32))
    with pytest.raises(openai.InternalServerError) as wide:
        ask(client, "shell-agent@v4")
    assert "rank 32" in wide.value.body["message"]
    assert text(client, "shell-agent") == good
    card = next(m for m in client.models.list().data if m.id == "shell-agent").model_dump()
    assert card["version"] == "v1" and set(card["rejected"]) == {"shell-agent@v2", "shell-agent@v3", "shell-agent@v4"}
    assert replica_stats()["rejected"].keys() >= {"shell-agent@v2", "shell-agent@v3", "shell-agent@v4"}


def test_least_recently_used_adapters_are_removed_from_vllm(store_dir: Path, client: openai.OpenAI) -> None:
    store = open_store(str(store_dir / "store"))
    specs = [prompt_spec(f"lru-{k}") for k in range(4)]
    for k, spec in enumerate(specs):
        put(store, spec, "v1", adapter(store_dir / f"lru{k}", seed=10 + k), probes=False)
    time.sleep(0.6)
    first = text(client, "lru-0")
    for spec in specs[1:]:
        ask(client, spec.name)
    stats = wait_for(lambda: (s := replica_stats())["adapters"] <= 3 and s, timeout=10)
    assert stats, replica_stats()
    assert len(stats["held"]) <= 3 and "lru-0@v1" not in stats["held"]
    assert text(client, "lru-0") == first  # loaded again, the same answer


def test_genpi_serve_check_on_vllm_checks_each_version_on_vllm(store_dir: Path) -> None:
    """``genpi serve --check`` with the vLLM backend checks on vLLM, in its interpreter: the good
    versions pass, the tampered, inert and too wide ones published above fail, exit code 1."""
    command = [
        sys.executable,
        "-m",
        "genpi.cli",
        "serve",
        "--check",
        *("--serve.backend", "vllm", "--store.url", str(store_dir / "store")),
        *("--models.target.name", EMBEDDED, "--models.target.dtype", "float32"),  # as the server above
        *("--models.target.max-context", "2048", "--models.target.kv-cache-gb", "1"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    lines = {line.split(":", 1)[0]: line for line in result.stdout.splitlines() if ": " in line}
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    assert lines["shell-agent@v1"].endswith("passed (on vLLM)") and lines["sql-agent@v1"].endswith("(on vLLM)")
    assert "parity check failed" in lines["shell-agent@v2"] and "changes nothing" in lines["shell-agent@v3"]
    assert "rank 32" in lines["shell-agent@v4"]
