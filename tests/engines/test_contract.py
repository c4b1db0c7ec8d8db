"""The engine contract, on both backends, through the Ray engine actors the job uses.

The embedded model in float32 on CPU: the hf backend in the job's environment, the vllm backend
in `.venv-vllm` (`make install-vllm`; Ray starts its actor on that interpreter). Float32, because
greedy bf16 decoding differs between the two engines' kernels; float32 decoding must not.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from genpi.config import ModelConfig, RayConfig
from genpi.engines.base import SamplingParams
from genpi.engines.environments import vllm_python
from genpi.models import EMBEDDED, resolve_model

pytestmark = pytest.mark.timeout(300)

BACKENDS = [
    "hf",
    pytest.param(
        "vllm", marks=pytest.mark.skipif(vllm_python() is None, reason="vLLM is not installed: run `make install-vllm`")
    ),
]
SHELL = [{"role": "system", "content": "You are a shell agent. Reply with one line: Act: bash `<command>`."}]
CONVERSATIONS = [
    SHELL + [{"role": "user", "content": "List the files in /tmp."}],
    SHELL + [{"role": "user", "content": "How much disk space is free on the root filesystem?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
]
SAMPLED = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=5)


@pytest.fixture(scope="module")
def ray_cluster():
    from genpi import ray_runtime

    ray_runtime.connect(RayConfig(num_cpus=2, dashboard=False))
    yield
    ray_runtime.disconnect()


@pytest.fixture(scope="module")
def adapter_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A LoRA adapter with random (non-zero) weights on the embedded model: it changes replies."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(EMBEDDED), dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    folder = tmp_path_factory.mktemp("adapter") / "lora"
    get_peft_model(model, config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module", params=BACKENDS)
def pool(request: pytest.FixtureRequest, ray_cluster: None):
    from genpi.engines.actors import EnginePool

    # One CPU reserved (the parity test starts two more engines beside it), both cores used.
    cfg = ModelConfig(
        name=EMBEDDED,
        backend=request.param,
        dtype="float32",
        num_gpus=0,
        num_cpus=1,
        threads=2,
        batch_size=4,
        max_context=1024,
        kv_cache_gb=1,
        max_lora_rank=16,
    )
    engines = EnginePool(cfg, "target")
    yield engines
    engines.shutdown()


def test_greedy_batched_equals_one_by_one(pool) -> None:
    params = SamplingParams(max_new_tokens=16)
    together = pool.generate(CONVERSATIONS, params)
    alone = [pool.generate([c], params)[0] for c in CONVERSATIONS]
    assert [g.text for g in together] == [g.text for g in alone]
    assert all(g.text for g in together)
    assert [g.prompt_tokens for g in together] == pool.count_tokens(CONVERSATIONS)


def test_sampling_is_seeded(pool) -> None:
    first = pool.generate(CONVERSATIONS, SAMPLED)
    assert [g.text for g in pool.generate(CONVERSATIONS, SAMPLED)] == [g.text for g in first]
    other = pool.generate(CONVERSATIONS, SamplingParams(**{**SAMPLED.__dict__, "seed": 6}))
    assert [g.text for g in first] != [g.text for g in other]


def test_seeds_are_per_request(pool) -> None:
    together = pool.generate(CONVERSATIONS, SAMPLED)
    alone = [pool.generate([c], SAMPLED)[0] for c in reversed(CONVERSATIONS)][::-1]
    assert [g.text for g in together] == [g.text for g in alone]
    twice = pool.generate([CONVERSATIONS[2]] * 2, SAMPLED)
    assert twice[0].text == together[2].text and twice[1].text != twice[0].text  # identical requests differ


def test_sampled_batch_longer_than_one_step(pool) -> None:
    """More prompt tokens than one engine step takes (vLLM: 4096): seeded sampling still works."""
    long = [
        [
            {"role": "system", "content": "Rules of the shell agent. " * 150},
            {"role": "user", "content": f"Task {k}: list the files."},
        ]
        for k in range(6)
    ]
    params = SamplingParams(max_new_tokens=4, temperature=1.0, seed=1)
    first = pool.generate(long, params)
    assert sum(g.prompt_tokens for g in first) > 4096 and all(g.output_tokens for g in first)
    assert [g.text for g in pool.generate(long, params)] == [g.text for g in first]


def test_finish_reasons(pool) -> None:
    gen = pool.generate(CONVERSATIONS[2:], SamplingParams(max_new_tokens=5))[0]
    assert gen.finish_reason == "length" and gen.output_tokens == 5
    short = pool.generate(CONVERSATIONS[:1], SamplingParams(max_new_tokens=200))[0]
    assert short.finish_reason == "stop" and short.stop_string == "" and 0 < short.output_tokens < 200
    too_long = [{"role": "user", "content": "word " * 2000}]
    gens = pool.generate([too_long] + CONVERSATIONS[2:], SamplingParams(max_new_tokens=5))
    assert gens[0].finish_reason == "context" and gens[0].text == "" and gens[0].output_tokens == 0
    assert gens[1].finish_reason == "length"  # the others still run


def test_stop_string_cuts_and_is_reported(pool) -> None:
    full = pool.generate(CONVERSATIONS[2:], SamplingParams(max_new_tokens=24))[0].text
    word = full.split()[2]
    cut = pool.generate(CONVERSATIONS[2:], SamplingParams(max_new_tokens=24, stop=(word,)))[0]
    assert cut.stop_string == word and cut.finish_reason == "stop"
    assert word not in cut.text and full.startswith(cut.text)


def test_adapters_per_request(pool, adapter_folder: str) -> None:
    name = pool.add_adapter(adapter_folder)
    params = SamplingParams(max_new_tokens=12)
    base = pool.generate(CONVERSATIONS, params)
    tuned = pool.generate(CONVERSATIONS, params, [name] * 3)
    mixed = pool.generate(CONVERSATIONS, params, [name, None, name])
    assert [g.text for g in mixed] == [tuned[0].text, base[1].text, tuned[2].text]
    assert [g.text for g in tuned] != [g.text for g in base]
    # A request names its adapter by folder; the actor loads a folder on first use.
    assert [g.text for g in pool.generate(CONVERSATIONS[:1], params, [adapter_folder])] == [tuned[0].text]
    with pytest.raises(Exception, match="has no adapter_config.json"):
        pool.generate(CONVERSATIONS[:1], params, [str(Path(adapter_folder).parent / "missing")])


def test_float32_greedy_parity_between_backends(ray_cluster: None, adapter_folder: str) -> None:
    """Both backends decode the same tokens, with and without an adapter."""
    if vllm_python() is None:
        pytest.skip("vLLM is not installed: run `make install-vllm`")
    from genpi.engines.actors import EnginePool

    texts = {}
    for backend in ("hf", "vllm"):
        cfg = ModelConfig(
            name=EMBEDDED,
            backend=backend,
            dtype="float32",
            num_gpus=0,
            num_cpus=1,
            threads=2,
            batch_size=4,
            max_context=1024,
            kv_cache_gb=1,
            max_lora_rank=16,
        )
        engines = EnginePool(cfg, "target")
        try:
            name = engines.add_adapter(adapter_folder)
            params = SamplingParams(max_new_tokens=24)
            texts[backend] = [
                g.text
                for g in engines.generate(CONVERSATIONS, params) + engines.generate(CONVERSATIONS, params, [name] * 3)
            ]
        finally:
            engines.shutdown()
    assert texts["vllm"] == texts["hf"]


def test_engines_are_sized_to_fit_the_cluster_together() -> None:
    from genpi.engines.actors import fit_engine_cpus

    gen, tgt = ModelConfig(name="a", num_cpus=2), ModelConfig(name="b", num_cpus=2)
    assert fit_engine_cpus(gen, tgt, 8) == (gen, tgt)  # they fit: untouched
    small_gen, small_tgt = fit_engine_cpus(gen, tgt, 2)  # 4 asked of 2: each halved
    assert (small_gen.num_cpus, small_tgt.num_cpus) == (1, 1) and small_gen.name == "a"
    shared = ModelConfig(name="a", num_cpus=2)
    assert fit_engine_cpus(shared, shared, 2) == (shared, shared)  # one shared pool: 2 of 2
    replicas = ModelConfig(name="b", num_cpus=2, replicas=3)
    assert [m.num_cpus for m in fit_engine_cpus(shared, replicas, 4)] == [1, 1]  # 8 asked of 4: halved


def test_a_prefilled_answer_is_continued(pool) -> None:
    """A conversation ending with an assistant message: the reply goes on from that message."""
    full = pool.generate(CONVERSATIONS[:1], SamplingParams(max_new_tokens=12))[0].text
    head = full[: full.index(" ", 4)]  # whole words of the greedy reply
    prefilled = CONVERSATIONS[0] + [{"role": "assistant", "content": head}]
    cont = pool.generate([prefilled], SamplingParams(max_new_tokens=6))[0]
    assert cont.text and full[len(head) :].strip().startswith(cont.text)  # replies come stripped
    assert cont.prompt_tokens == pool.count_tokens([prefilled])[0] > pool.count_tokens(CONVERSATIONS[:1])[0]
