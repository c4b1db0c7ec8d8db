"""Config: defaults, profiles, YAML and flags, validation errors, hashes, help."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from genpi import artifacts
from genpi.config import (
    PROFILES,
    GenPIConfig,
    add_config_flags,
    config_from_dict,
    load_config,
    overrides_from_args,
)
from genpi.errors import ConfigError
from genpi.prompt.spec import PromptSpec, Turn


def test_defaults_are_the_papers() -> None:
    cfg = load_config("paper")
    assert cfg.synth.num_inputs == 1000
    assert (cfg.synth.input_temperature, cfg.synth.input_top_p) == (1.0, 0.9)
    assert (cfg.synth.reason_temperature, cfg.synth.reason_top_p) == (0.7, 0.9)
    t = cfg.train
    assert (t.lora_r, t.lora_alpha, t.lora_dropout, t.learning_rate, t.epochs, t.batch_size) == (
        16,
        32,
        0.05,
        1e-4,
        10,
        32,
    )
    assert (t.lr_scheduler, t.warmup_ratio, t.max_grad_norm, t.target_modules) == ("cosine", 0.03, 1.0, "all-linear")
    assert t.quantization == "auto" and t.num_gpus == 1


def test_local_profile_is_small() -> None:
    cfg = load_config("local")
    assert 16 <= cfg.synth.num_inputs <= 64
    assert cfg.train.num_gpus == 0 and cfg.eval.num_gpus == 0
    # small enough for 2 CPU cores: few steps, few PG examples (each carries the whole prompt)
    trained = round(cfg.synth.num_inputs * (1 - cfg.split.test_fraction - cfg.split.val_fraction))
    steps = max(-(-trained // cfg.train.batch_size) * cfg.train.epochs, cfg.train.min_steps)  # as the trainer counts
    assert steps <= 40 and cfg.train.pg_fraction <= 0.25
    assert cfg.store.url == "artifacts"


def test_eval_is_not_part_of_the_synthesis_key_and_the_split_is() -> None:
    base = load_config("local")
    changed = load_config("local", overrides={"eval.max_turns": 2})
    assert artifacts.synth_hash(base) == artifacts.synth_hash(changed)
    assert artifacts.eval_hash(base) != artifacts.eval_hash(changed)
    split = load_config("local", overrides={"split.test_fraction": 0.4})
    assert artifacts.synth_hash(split) != artifacts.synth_hash(base)  # test records are not role-played
    assert artifacts.train_hash(split) != artifacts.train_hash(base)
    placement = load_config("local", overrides={"eval.num_cpus": 1, "eval.batch_size": 3})
    assert artifacts.eval_hash(placement) == artifacts.eval_hash(base)


def test_references_are_shared_by_every_run_and_change_with_what_shapes_them() -> None:
    spec = PromptSpec(name="p", source="p.md", turns=(Turn("system", "Be brief."),))
    base = load_config("local")
    key = artifacts.reference_prefix(spec, base, ["a real input"])
    for same in ({"train.pg_lambda": 0.3, "train.seed": 4}, {"eval.num_cpus": 1}, {"eval.min_retention": 0.5}):
        assert artifacts.reference_prefix(spec, load_config("local", overrides=same), ["a real input"]) == key
    for other in ({"eval.max_turns": 2}, {"eval.teacher_samples": 2}, {"split.test_fraction": 0.4}, {"synth.seed": 9}):
        assert artifacts.reference_prefix(spec, load_config("local", overrides=other), ["a real input"]) != key
    assert artifacts.reference_prefix(spec, base, []) != key


def test_precedence_defaults_profile_yaml_flags(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("synth:\n  num_inputs: 48\n  seed: 3\ntrain:\n  pg_lambda: 0.5\n")
    cfg = load_config("local", path, {"synth.seed": "7", "models.target.name": "tiny-random-llama"})
    assert cfg.synth.num_inputs == 48  # YAML over profile
    assert cfg.synth.seed == 7  # flag over YAML, coerced from text
    assert cfg.train.pg_lambda == 0.5
    assert cfg.train.epochs == PROFILES["local"]["train"]["epochs"]  # profile over defaults
    assert cfg.models.target.name == "tiny-random-llama"


@pytest.mark.parametrize(
    "yaml_text, words",
    [
        ("synth:\n  num_inputz: 3\n", ["synth.num_inputz", "num_inputs"]),
        ("train:\n  lr: 0.1\n", ["train.lr", "did you mean 'learning_rate'?"]),
        ("synth: 3\n", ["synth", "mapping"]),
        ("train:\n  epochs: ten\n", ["train.epochs", "int", "ten"]),
        ("train:\n  epochs: 1.5\n", ["train.epochs", "int"]),
        ("train:\n  pg_lambda: 1.5\n", ["train.pg_lambda", "at most 1"]),
        ("train:\n  lr_scheduler: step\n", ["train.lr_scheduler", "cosine", "linear", "constant"]),
        ("models:\n  target:\n    device: tpu\n", ["models.target.device", "auto", "cpu", "cuda"]),
        ("train:\n  quantization: nf4\n  num_gpus: 0\n", ["nf4", "CUDA"]),
        ("train:\n  micro_batch_size: 64\n  batch_size: 8\n", ["micro_batch_size", "batch_size"]),
        ("synth: [\n", ["not valid YAML"]),
        ("train:\n  epochs: 1\n  seed: 2\n  epochs: 3\n", ["line 4", "'epochs' appears twice", "first at line 2"]),
        ("train:\n  <<: {epochs: 1}\n  epochs: ten\n", ["train.epochs", "ten"]),  # a merge may be overridden
    ],
)
def test_yaml_errors_name_the_field(tmp_path, yaml_text: str, words: list[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config("paper", path)
    for word in words:
        assert word in str(err.value)


def test_missing_config_file_and_profile() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("local", "/nonexistent/genpi.yaml")
    with pytest.raises(ConfigError, match="unknown profile 'huge'.*paper, local"):
        load_config("huge")


def test_flag_error_names_the_flag() -> None:
    with pytest.raises(ConfigError, match="--synth.num-inputs"):
        load_config("local", overrides={"synth.num_inputs": "many"})


def test_round_trip_through_dict() -> None:
    cfg = load_config("local", overrides={"train.pg_lambda": 0.7, "store.url": "s3://b/p"})
    assert config_from_dict(cfg.to_dict()) == cfg


def test_hashes_follow_what_the_data_depends_on() -> None:
    base = load_config("local")
    placed = load_config(
        "local",
        overrides={"models.target.replicas": 4, "models.target.batch_size": 3, "train.num_cpus": 1, "train.threads": 1},
    )
    assert artifacts.synth_hash(placed) == artifacts.synth_hash(base) and artifacts.train_hash(
        placed
    ) == artifacts.train_hash(base)
    more = load_config("local", overrides={"synth.num_inputs": 40})
    assert artifacts.synth_hash(more) != artifacts.synth_hash(base) and artifacts.train_hash(
        more
    ) == artifacts.train_hash(base)
    lam = load_config("local", overrides={"train.pg_lambda": 0.5})
    assert artifacts.synth_hash(lam) == artifacts.synth_hash(base) and artifacts.train_hash(
        lam
    ) != artifacts.train_hash(base)
    assert artifacts.train_hash(load_config("local", overrides={"train.kl_weight": 2})) == artifacts.train_hash(
        base
    )  # genpi reads none
    kld = load_config("local", overrides={"train.method": "genpi-kld"})
    for setting, value in (("train.kl_weight", 2), ("train.pg_lambda", 0.5)):
        changed = load_config("local", overrides={"train.method": "genpi-kld", setting: value})
        assert artifacts.train_hash(changed) != artifacts.train_hash(kld), setting
    other_model = load_config("local", overrides={"models.target.name": "tiny-random-llama"})
    assert artifacts.synth_hash(other_model) != artifacts.synth_hash(base) and artifacts.train_hash(
        other_model
    ) != artifacts.train_hash(base)


def test_every_field_has_a_flag_with_help() -> None:
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    text = parser.format_help()

    def walk(obj, path: str):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            where = f"{path}.{f.name}" if path else f.name
            if dataclasses.is_dataclass(value):
                yield from walk(value, where)
            else:
                assert f.metadata["help"], where
                yield where

    names = list(walk(GenPIConfig(), ""))
    assert len(names) > 50
    for where in names:
        assert f"--{where.replace('_', '-')}" in text
    args = parser.parse_args(["--train.pg-lambda", "0.5", "--synth.seed", "2"])
    assert overrides_from_args(args) == {"train.pg_lambda": "0.5", "synth.seed": "2"}


def test_a_command_gets_the_flags_of_its_sections_only() -> None:
    parser = argparse.ArgumentParser()
    add_config_flags(parser, ("models.target", "serve"))
    text = parser.format_help()
    assert "--models.target.name" in text and "--serve.replicas" in text
    assert "--models.generator" not in text and "--train." not in text and "--store.url" not in text
    assert overrides_from_args(parser.parse_args(["--models.target.device", "cpu"])) == {"models.target.device": "cpu"}
    with pytest.raises(SystemExit):
        parser.parse_args(["--models.generator.name", "x"])


def test_sweep_lists_from_flags_and_yaml_and_their_runs(tmp_path) -> None:
    cfg = load_config(
        "local", overrides={"train.methods": "genpi, sft,prepend", "train.lambdas": "0.3,0.5", "train.seeds": "0,1"}
    )
    assert (cfg.train.methods, cfg.train.lambdas, cfg.train.seeds) == (["genpi", "sft", "prepend"], [0.3, 0.5], [0, 1])
    runs = cfg.train_runs()
    assert [(r.train.method, r.train.pg_lambda, r.train.seed) for r in runs] == [
        ("genpi", 0.3, 0),
        ("genpi", 0.3, 1),
        ("genpi", 0.5, 0),
        ("genpi", 0.5, 1),
        ("sft", cfg.train.pg_lambda, 0),
        ("sft", cfg.train.pg_lambda, 1),
        ("prepend", cfg.train.pg_lambda, 0),
        ("prepend", cfg.train.pg_lambda, 1),
    ]
    assert all(r.train.methods == r.train.lambdas == r.train.seeds == [] for r in runs)
    assert len({artifacts.train_hash(r) for r in runs}) == 8 and config_from_dict(cfg.to_dict()) == cfg
    # no sweep: the one run the scalars describe, with the same key as the config itself
    single = load_config("local")
    assert [artifacts.train_hash(r) for r in single.train_runs()] == [artifacts.train_hash(single)]
    # the paper profile sweeps the paper's lambdas, 3 seeds each
    paper = [(r.train.pg_lambda, r.train.seed) for r in load_config("paper").train_runs()]
    assert paper == [(lam, seed) for lam in (0.3, 0.5, 0.7) for seed in (0, 1, 2)]
    path = tmp_path / "sweep.yaml"
    path.write_text("train:\n  methods: [sft, seqkd-kld]\n  seeds: [3]\n")
    assert [(r.train.method, r.train.seed) for r in load_config("local", path).train_runs()] == [
        ("sft", 3),
        ("seqkd-kld", 3),
    ]
    with pytest.raises(ConfigError, match=r"'train.methods\[1\]' is 'dpo'; allowed: genpi, sft"):
        load_config("local", overrides={"train.methods": "sft,dpo"})
    with pytest.raises(ConfigError, match=r"'train.lambdas\[0\]' is 1.5; it must be at most 1"):
        load_config("local", overrides={"train.lambdas": "1.5"})
    with pytest.raises(ConfigError, match=r"'train.seeds' must be a list of int"):
        load_config("local", path.write_text("train:\n  seeds: {a: 1}\n") and path)


def test_a_run_key_ignores_settings_its_method_does_not_read() -> None:
    sft = load_config("local", overrides={"train.method": "sft"})
    assert artifacts.train_hash(
        load_config("local", overrides={"train.method": "sft", "train.pg_lambda": 0.9})
    ) == artifacts.train_hash(sft)
    assert artifacts.train_hash(
        load_config("local", overrides={"train.method": "sft", "train.kl_weight": 2})
    ) == artifacts.train_hash(sft)
    prepend = load_config("local", overrides={"train.method": "prepend"})
    assert artifacts.train_hash(
        load_config("local", overrides={"train.method": "prepend", "train.prepend_fraction": 0.5})
    ) != artifacts.train_hash(prepend)
    genpi = load_config("local")
    assert artifacts.train_hash(load_config("local", overrides={"train.pg_lambda": 0.5})) != artifacts.train_hash(genpi)
    assert artifacts.train_hash(load_config("local", overrides={"train.kl_weight": 3})) == artifacts.train_hash(genpi)
    for placement in ({"train.max_failures": 5}, {"train.checkpoint_steps": 3}):
        assert artifacts.train_hash(load_config("local", overrides=placement)) == artifacts.train_hash(genpi)
