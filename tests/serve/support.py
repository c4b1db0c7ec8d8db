"""Helpers for the server's tests: random LoRA adapters on the tiny model, published through the
registry with their parity probes, and the app on a private Ray cluster (one per test module)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from genpi import parity, registry
from genpi.models import TINY
from genpi.prompt.spec import PromptSpec, Turn
from genpi.store import ArtifactStore

KEY = "sk-genpi-test"
INPUTS = ["List the files in /tmp.", "Show the kernel version.", "How much disk is free?"]
HELLO = [{"role": "user", "content": INPUTS[0]}]


def prompt_spec(name: str, words: int = 60) -> PromptSpec:
    """An agent prompt long enough to be worth caching."""
    system = f"You are {name}, a shell agent. Reply with one line: Act: bash `<command>`. " + "Be brief. " * words
    return PromptSpec(name=name, source=f"{name}.md", turns=(Turn("system", system),), example_inputs=tuple(INPUTS))


def random_adapter(folder: Path, seed: int, zero: bool = False, rank: int = 8, model: str = TINY) -> Path:
    """A LoRA adapter with random weights on ``model`` (it changes replies), or all-zero ``lora_B``
    weights (``zero``: it loads and changes nothing)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from genpi.models import resolve_model

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(model), dtype=torch.float32)
    lora = get_peft_model(
        model,
        LoraConfig(r=rank, lora_alpha=8 * rank, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False),
    )
    if zero:
        with torch.no_grad():
            for name, p in lora.named_parameters():
                if "lora_B" in name:
                    p.zero_()
    lora.save_pretrained(folder)
    return folder


_ENGINES: dict[str, Any] = {}


def probe_engine(model: str = TINY) -> Any:
    """A float32 engine for recording probes, as the evaluate stage does (one a model per test process)."""
    if model not in _ENGINES:
        from genpi.engines.hf import HFEngine

        _ENGINES[model] = HFEngine(model, dtype=parity.PROBE_DTYPE, turn_cache_mib=0)
    return _ENGINES[model]


def publish(
    store: ArtifactStore,
    spec: PromptSpec,
    version: str,
    folder: Path,
    probes_from: Path | None = None,
    probes: bool = True,
    model: str = TINY,
) -> registry.PublishedAdapter:
    """Publish ``folder`` (an adapter of ``model``) as ``spec.name@version`` with probes recorded from
    ``probes_from`` (default: the adapter itself; another adapter's answers make a tampered version)."""
    source = f"runs/{spec.name}/{version}/adapter"
    store.upload_dir(folder, source)
    recorded: list[dict] = []
    if probes:
        engine = probe_engine(model)
        name = engine.add_adapter(probes_from or folder)
        recorded = parity.record(engine, name, INPUTS)
        engine.remove_adapter(name)
    registry.record_prompt(store, spec)
    return registry.publish(
        store,
        source,
        registry.PublishedAdapter(
            prompt=spec.name,
            version=version,
            prompt_hash=spec.prompt_hash,
            run_hash=version,
            base_model=model,
            published_at="",
            retention={"format_valid": 0.9},
            gap_closed={"nll": 0.6},
            probes=recorded,
        ),
    )


def two_published(root: Path, model: str = TINY) -> Path:
    """A store under ``root`` with adapters of ``model`` published for shell-agent and sql-agent
    (``v1``, from ``root/shell`` and ``root/sql``); returns ``root``."""
    from genpi.store import open_store

    store = open_store(str(root / "store"))
    for seed, name in enumerate(("shell", "sql"), start=1):
        folder = random_adapter(root / name, seed=seed, model=model)
        publish(store, prompt_spec(f"{name}-agent"), "v1", folder, model=model)
    return root


def serve_config(store_url: str, port: int, **overrides: Any) -> Any:
    from genpi.config import load_config

    flags = {
        "store.url": store_url,
        "models.target.name": TINY,
        "models.target.dtype": "float32",
        "models.target.batch_size": 16,
        "models.target.backend": "hf",
        "serve.port": port,
        "serve.num_cpus": 1,
        "serve.max_adapters": 3,
        "serve.batch_window_ms": 30,
        "serve.refresh_s": 0.5,
        "serve.max_tokens": 16,
        "ray.num_cpus": 2,
        "ray.dashboard": False,
        **overrides,
    }
    return load_config("local", overrides=flags)


def start_app(cfg: Any, specs: list[PromptSpec]) -> Iterator[str]:
    """Run the app on a private Ray cluster; yields its base URL (``http://127.0.0.1:PORT/v1``)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray import serve

    from genpi import ray_runtime
    from genpi.serve import application

    ray_runtime.connect(cfg.ray)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": cfg.serve.port})
        serve.run(application(cfg, specs), name="genpi", route_prefix="/")
        yield f"http://127.0.0.1:{cfg.serve.port}/v1"
    finally:
        serve.shutdown()
        ray_runtime.disconnect()


def replica_stats() -> dict[str, Any]:
    from ray import serve

    return serve.get_deployment_handle("ModelServer", app_name="genpi").stats.remote().result()


def wait_for(check: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def ask(client: Any, model: str, messages: list[dict[str, str]] = HELLO, **kw: Any) -> Any:
    """A greedy chat completion of at most 12 tokens (unless ``kw`` says otherwise), raw response."""
    kw = {"temperature": 0, "max_tokens": 12, **kw}
    return client.chat.completions.with_raw_response.create(model=model, messages=messages, **kw)


def streamed_as_whole(client: Any, model: str) -> list[str]:
    """Stream a reply and check it against the same request unstreamed (text, finish reason, usage
    last); the text deltas."""
    whole = ask(client, model, max_tokens=16).parse()
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=HELLO,
            temperature=0,
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    return deltas
