"""Adapter training on the tiny model and the resumable training stage."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from genpi import artifacts
from genpi.config import load_config
from genpi.errors import ArtifactNotFound, GenPIError, PromptError
from genpi.models import TINY, resolve_model
from genpi.prompt.splits import assign_splits
from genpi.store import LocalStore
from genpi.synth.stage import synthesize
from genpi.train import stage as train_stage
from genpi.train.examples import (
    RecordExamples,
    build_examples,
)
from genpi.train.trainer import load_for_training, train_adapter
from tests.fakes import FakeEngine, World
from tests.train.tiny import LORA_PARAMS_PER_RANK, SPEC, short_pairs, tcfg, with_turn


@pytest.mark.timeout(180)
def test_train_adapter_writes_a_loadable_lora_adapter(tokenizer, tmp_path: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    pairs = short_pairs(tokenizer)
    cfg = tcfg(batch_size=2, micro_batch_size=1, learning_rate=1e-2, warmup_ratio=0.0, lora_r=2, lora_alpha=4)
    lines: list[str] = []
    metrics = train_adapter(cfg, TINY, "float32", pairs[:3], pairs[3:], tmp_path / "adapter", log=lines.append)
    assert metrics["steps"] == 2 == len(metrics["history"])  # ceil(3 / 2) steps, 1 epoch
    assert metrics["epochs"] == 1 and metrics["quantized_nf4"] is False
    assert metrics["trainable_params"] == LORA_PARAMS_PER_RANK * 2  # LoRA on every linear but the LM head
    assert metrics["total_params"] > 100 * metrics["trainable_params"]
    assert "val_loss" in metrics["final"] and math.isfinite(metrics["final"]["loss"])
    assert [h["lr"] for h in metrics["history"]] == pytest.approx([1e-2, 1e-2 * 0.5 * (1 + math.cos(math.pi / 2))])
    assert len(lines) == 3 and lines[0].startswith("step 1/2 epoch 1 loss")

    # min_steps adds passes, the last one partial: 3 records in steps of 2 make 2 steps a pass
    longer = train_adapter(
        dataclasses.replace(cfg, min_steps=5),
        TINY,
        "float32",
        pairs[:3],
        pairs[3:],
        tmp_path / "longer",
        log=lambda line: None,
    )
    assert longer["steps"] == 5 == len(longer["history"]) and longer["epochs"] == 3
    assert [h["epoch"] for h in longer["history"]] == [0, 0, 1, 1, 2]
    assert "val_loss" in longer["final"]  # after the last (partial) pass

    out = tmp_path / "adapter"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and all("lora_A" in k or "lora_B" in k for k in weights)
    assert not any("lm_head" in k for k in weights)
    assert sum(w.numel() for w in weights.values()) == metrics["trainable_params"]
    assert any(k.endswith("lora_B.weight") and w.abs().sum() > 0 for k, w in weights.items())  # it trained
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 4
    assert config["target_modules"] == sorted(config["target_modules"])  # the same bytes from every process

    base = AutoModelForCausalLM.from_pretrained(resolve_model(TINY), dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(out))
    state = loaded.state_dict()
    for key, value in weights.items():
        match = [k for k in state if k.replace(".default", "") == key]
        assert len(match) == 1, key
        torch.testing.assert_close(state[match[0]], value)


@pytest.mark.timeout(60)
def test_only_lora_parameters_are_trainable() -> None:
    model, _ = load_for_training(tcfg(lora_r=3), TINY, "float32")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2  # 2 layers x 7 linears x (A, B)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == LORA_PARAMS_PER_RANK * 3


def test_lora_layers_puts_adapters_on_the_top_layers_only() -> None:
    model, _ = load_for_training(tcfg(lora_r=3, lora_layers=1), TINY, "float32")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 7 * 2 and all(".layers.1." in n for n in trainable)  # 7 linears x (A, B)
    every = load_for_training(tcfg(lora_r=3, lora_layers=5), TINY, "float32")[0]  # more than the model has
    assert sum(p.requires_grad for p in every.parameters()) == 2 * 7 * 2


@pytest.mark.parametrize("ratio", [1.0, 16.0])
def test_loraplus_trains_the_b_matrices_at_ratio_times_the_learning_rate(tokenizer, tmp_path: Path, ratio) -> None:
    from safetensors.torch import load_file

    # One step of Adam moves every parameter with a gradient by its learning rate. B starts at 0 and
    # A gets no gradient on the first step (its gradient goes through B), so after one step every
    # moved B entry is +-lr * ratio and A is as initialized.
    cfg = tcfg(batch_size=3, learning_rate=1e-3, warmup_ratio=0.0, loraplus_lr_ratio=ratio, max_grad_norm=0.0)
    metrics = train_adapter(cfg, TINY, "float32", short_pairs(tokenizer)[:3], [], tmp_path / "a", log=lambda _: None)
    assert metrics["steps"] == 1
    weights = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b = torch.cat([w.flatten() for k, w in weights.items() if "lora_B" in k])
    moved = b[b != 0].abs()
    assert moved.numel() > 0.9 * b.numel()  # nearly every entry got a gradient
    torch.testing.assert_close(moved.median(), torch.tensor(1e-3 * ratio), rtol=1e-3, atol=0)


def test_plain_lora_keeps_the_run_keys_stored_before_loraplus() -> None:
    cfg = load_config("local")
    assert "loraplus_lr_ratio" not in artifacts.train_key(cfg)["train"]  # the key of every earlier run
    plus = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, loraplus_lr_ratio=4.0))
    assert artifacts.train_key(plus)["train"]["loraplus_lr_ratio"] == 4.0
    assert artifacts.run_hash(plus) != artifacts.run_hash(cfg)


# ------------------------------------------------------------------ the training stage


@pytest.mark.timeout(240)
def test_train_prompt_from_a_synthesized_store(tmp_path: Path, monkeypatch, tokenizer) -> None:
    store = LocalStore(tmp_path)
    cfg = load_config(
        "local",
        overrides={
            "synth.num_inputs": 5,
            "synth.min_inputs": 4,
            "synth.part_size": 8,
            "synth.max_turns": 2,
            "synth.reason_fraction": 1.0,
            "train.min_steps": 0,
            "split.val_fraction": 0.2,
            "split.test_fraction": 0.2,
            "models.target.name": TINY,
            "models.generator.name": TINY,
            "models.target.dtype": "float32",
            "train.epochs": 1,
            "train.batch_size": 2,
            "train.micro_batch_size": 2,
            "train.lora_r": 2,
            "train.pg_lambda": 0.4,
            "train.quantization": "none",
            "train.threads": 2,
        },
    )
    world = World(SPEC)
    synthesize(SPEC, cfg, FakeEngine(world), FakeEngine(world), store)
    seen: dict[str, list] = {}
    real_train_adapter = train_stage.train_adapter

    def spy(train_cfg, model, dtype, train, val, out, log, checkpoints, on_step):
        seen.update(train=train, val=val, checkpoints=checkpoints)
        return real_train_adapter(train_cfg, model, dtype, train, val, out, log, checkpoints, on_step)

    monkeypatch.setattr(train_stage, "train_adapter", spy)
    prefix = train_stage.train_prompt(SPEC, cfg, store)
    assert prefix == artifacts.train_prefix(SPEC, cfg)
    keys = store.list_keys(prefix)
    for name in (
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "adapter/genpi.json",
        "metrics.json",
        "summary.json",
        "_SUCCESS",
    ):
        assert f"{prefix}/{name}" in keys, name
    provenance = store.get_json(f"{prefix}/adapter/genpi.json")
    assert provenance["prompt_hash"] == SPEC.prompt_hash and provenance["prompt_id"] == SPEC.id
    assert provenance["run_hash"] == artifacts.run_hash(cfg) and provenance["synth_hash"] == artifacts.synth_hash(cfg)
    assert provenance["pg_lambda"] == 0.4 and provenance["base_model"] == TINY
    metrics = store.get_json(f"{prefix}/metrics.json")
    examples = metrics["examples"]
    assert (examples["sft"], examples["pg"], examples["max_len"]) == (4, 4, 2048)  # the test record is left out
    assert examples["sft_examples_dropped"] == 0 and examples["pg_examples_dropped"] == 0
    assert metrics["steps"] == 2  # 3 training records, batch 2, 1 epoch
    summary = store.get_json(f"{prefix}/summary.json")
    assert summary["records"] == {"train": 3, "val": 1, "test": 1} and summary["run_hash"] == artifacts.run_hash(cfg)
    # trained on exactly the "train" records and validated on the "val" ones, never on "test"
    records = store.get_jsonl(f"{artifacts.synth_prefix(SPEC, cfg)}/records.jsonl")
    split = assign_splits([r["id"] for r in records], 0.2, 0.2, cfg.split.seed)
    for name in ("train", "val"):
        expected, _ = build_examples(tokenizer, [r for r in records if split[r["id"]] == name], SPEC, 2048)
        assert seen[name] == expected, name
    assert summary["adapter"] == store.location(f"{prefix}/adapter")
    assert store.done_info(prefix)["run_hash"] == artifacts.run_hash(cfg)
    assert seen["checkpoints"].prefix == f"{prefix}/checkpoints"  # checkpointed each epoch in the store,
    assert not store.list_keys(f"{prefix}/checkpoints")  # and dropped once the run was done

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run must not train again")

    monkeypatch.setattr(train_stage, "train_adapter", no_training)
    assert train_stage.train_prompt(SPEC, cfg, store) == prefix
    # a different lambda is a different run and would train
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, pg_lambda=0.5))
    with pytest.raises(AssertionError, match="must not train again"):
        train_stage.train_prompt(SPEC, other, store)


def test_train_prompt_fails_before_training_when_pg_cannot_fit(tmp_path: Path, monkeypatch) -> None:
    cfg = load_config(
        "local",
        overrides={
            "models.target.name": TINY,
            "models.generator.name": TINY,
            "train.max_seq_len": 64,
            "train.threads": 2,
        },
    )
    monkeypatch.setattr(train_stage, "train_adapter", lambda *a, **k: pytest.fail("must fail before training"))
    empty = LocalStore(tmp_path)  # the check comes before the records are even read
    with pytest.raises(
        PromptError,
        match=r"prompts/mini-shell\.md: the prompt is [\d,]+ tokens .* "
        r"max_len=64, .* raise train\.max_seq_len",
    ):
        train_stage.train_prompt(SPEC, cfg, empty)
    # with lambda 0 no PG example is trained, so the check does not apply: the stage goes on to the records
    sft_only = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, pg_lambda=0.0))
    with pytest.raises(ArtifactNotFound):
        train_stage.train_prompt(SPEC, sft_only, empty)


def test_train_prompt_names_why_no_example_could_be_built(tmp_path: Path) -> None:
    cfg = load_config(
        "local", overrides={"models.target.name": TINY, "models.generator.name": TINY, "train.threads": 2}
    )
    store = LocalStore(tmp_path)
    cut = with_turn(0, agent=" ")
    store.put_jsonl(
        f"{artifacts.synth_prefix(SPEC, cfg)}/records.jsonl", [{**cut, "id": i, "student": ""} for i in range(4)]
    )
    with pytest.raises(
        GenPIError,
        match=r"prompts/mini-shell\.md: no training example could be built within "
        r"2048 tokens .*records have no learnable agent turn.* PG examples with an "
        r"empty answer or reason",
    ):
        train_stage.train_prompt(SPEC, cfg, store)


def test_pg_fraction_spreads_the_kept_pg_examples_evenly() -> None:
    from genpi.train.objectives.genpi import pg_kept, with_pg_fraction

    assert [pg_kept(1.0, s, 4) for s in range(5)] == [4] * 5  # the paper: every PG example
    assert [pg_kept(0.0, s, 4) for s in range(5)] == [0] * 5
    kept = [pg_kept(0.1, s, 4) for s in range(50)]
    assert sum(kept) == 20 and max(kept) == 1 and kept[:5] == [0, 0, 1, 0, 1]
    R = RecordExamples
    pairs = [R("s1", "p1"), R("s2", "p2"), R(None, "p3")]
    assert with_pg_fraction(pairs, 1) == [R("s1", "p1"), R("s2", None), R(None, None)]
    assert with_pg_fraction([R("s0", None)] + pairs, 1)[:2] == [R("s0", None), R("s1", "p1")]  # quota spent on real PG
    assert with_pg_fraction(pairs, 4) == pairs
