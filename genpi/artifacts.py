"""What each stage's output depends on, and where it lives in the store: keys built from content hashes.

```
prompts/<name>/<prompt_hash>/synth/<synth_hash>/...          (inputs, outputs, reasons, conversations,
                                                               records.jsonl, quality.json, examples/)
prompts/<name>/<prompt_hash>/references/<key>/...             (the teacher's and the base's episodes, samples)
prompts/<name>/<prompt_hash>/train/<run_hash>/...             (adapter/, metrics.json, summary.json)
prompts/<name>/<prompt_hash>/eval/<eval_key>/...               (episodes/, scores/, report.json|md, *.png;
                                                               a run's validation figures: summary.json)
prompts/<name>/<prompt_hash>/selection/<key>/selection.json   (a sweep's runs side by side, the one chosen)
adapters/<name>/<prompt_hash8>-<run_hash8>/...                 (published adapter + manifest.json: genpi.registry)
adapters/<name>/_prompts/<prompt_hash>.json                    (the prompt's text, for prompt mode: genpi.registry)
batches/<batch_hash>/manifest.json, report.json, report.md
```
``synth_hash`` covers the synthesis config and both models (by name and content); ``run_hash`` covers the data it
trained on (``synth_hash``) and the training config. Every stage folder is finished when its
``_SUCCESS`` marker exists, so a rerun with the same inputs finds it and redoes nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from genpi.config import METHOD_SETTINGS, GenPIConfig, ModelConfig
from genpi.fingerprint import fingerprint
from genpi.models import model_fingerprint
from genpi.prompt.spec import PromptSpec

# Bump when the code changes what a stage produces (wording, algorithm), so stored results of
# the old code are not reused.
SYNTH_VERSION = 4  # 4: test records not role-played or explained (3: no answer to the last turn, hf seeds)
TRAIN_VERSION = 2
# train settings that change where and how often a run works, or which runs a sweep makes, never an adapter
TRAIN_PLACEMENT = (
    "num_gpus",
    "num_cpus",
    "threads",
    "max_failures",
    "checkpoint_steps",
    "timeout_s",
    "methods",
    "lambdas",
    "seeds",
)
EVAL_VERSION = 7  # 3: the real inputs' set is named "real" (was "user"); 4: intervals on every figure;
# 5: the teacher's and the base's episodes and the teacher's samples come from the references;
# 6: teacher-forced scores read a whole episode off one forward, rows batched; 7: a greedy `.+` before
# a line break in an action regex is reasoning (actions compared without it)
REFERENCE_VERSION = 1


def model_identity(model: ModelConfig) -> dict[str, Any]:
    """What of a model role changes its outputs. Placement (replicas, devices, batch size) changes
    speed, not the data; the backend stays: two engines give different bf16 numerics. The model
    enters by its content as well as its name: new weights under the same name are a new model."""
    return {
        "name": model.name,
        "content": model_fingerprint(model.name),
        "backend": model.backend,
        "dtype": model.dtype,
        "max_context": model.max_context,
    }


def synth_key(cfg: GenPIConfig) -> dict[str, Any]:
    """Everything synthesized data depends on (hashed into its store key)."""
    synth = {k: v for k, v in dataclasses.asdict(cfg.synth).items() if k != "prompts_in_flight"}
    return {
        "version": SYNTH_VERSION,
        "synth": synth,
        "split": dataclasses.asdict(cfg.split),  # only the records training reads are role-played
        "generator": model_identity(cfg.models.generator),
        "target": model_identity(cfg.models.target),
    }


def train_key(cfg: GenPIConfig) -> dict[str, Any]:
    """Everything one run's adapter depends on besides its data (hashed into its store key).

    Settings its method does not read are left out, so e.g. an ``sft`` run is the same run
    whatever ``pg_lambda`` says, and a sweep reuses every run it shares with an earlier one.
    """
    train = dataclasses.asdict(cfg.train)
    for placement in TRAIN_PLACEMENT:
        train.pop(placement)
    if cfg.train.loraplus_lr_ratio == 1:  # plain LoRA: the key of runs stored before LoRA+ existed
        train.pop("loraplus_lr_ratio")
    read = set(METHOD_SETTINGS[cfg.train.method])
    for name in {n for settings in METHOD_SETTINGS.values() for n in settings} - read:
        train.pop(name)
    return {
        "version": TRAIN_VERSION,
        "train": train,
        "split": dataclasses.asdict(cfg.split),
        "target": model_identity(cfg.models.target),
    }


def eval_key(cfg: GenPIConfig) -> dict[str, Any]:
    """Everything an evaluation depends on besides the adapter it scores (hashed into its key)."""
    evaluation = dataclasses.asdict(cfg.eval)
    for resource in ("num_gpus", "num_cpus", "threads", "batch_size", "timeout_s"):
        evaluation.pop(resource)
    return {
        "version": EVAL_VERSION,
        "eval": evaluation,
        "split": dataclasses.asdict(cfg.split),
        "target": model_identity(cfg.models.target),
    }


def synth_hash(cfg: GenPIConfig) -> str:
    return fingerprint(synth_key(cfg))


def train_hash(cfg: GenPIConfig) -> str:
    return fingerprint(train_key(cfg))


def eval_hash(cfg: GenPIConfig) -> str:
    return fingerprint(eval_key(cfg))


def prompt_root(spec: PromptSpec) -> str:
    return f"prompts/{spec.name}/{spec.prompt_hash}"


def synth_prefix(spec: PromptSpec, cfg: GenPIConfig) -> str:
    return f"{prompt_root(spec)}/synth/{synth_hash(cfg)}"


def run_hash(cfg: GenPIConfig) -> str:
    return fingerprint({"synth": synth_hash(cfg), "train": train_key(cfg)})


def train_prefix(spec: PromptSpec, cfg: GenPIConfig) -> str:
    return f"{prompt_root(spec)}/train/{run_hash(cfg)}"


def eval_prefix(spec: PromptSpec, cfg: GenPIConfig, real_inputs: list[str]) -> str:
    """An evaluation depends on the adapter's run, the eval config and split, and the real inputs."""
    # "user_inputs" was the real inputs' earlier name; the key keeps it so stored evaluations stay found.
    key = fingerprint({"run": run_hash(cfg), "eval": eval_hash(cfg), "user_inputs": real_inputs})
    return f"{prompt_root(spec)}/eval/{key}"


def reference_prefix(spec: PromptSpec, cfg: GenPIConfig, real_inputs: list[str]) -> str:
    """The teacher's and the base's episodes and the teacher's samples on the evaluation inputs
    (:mod:`genpi.evaluate.references`): the records, the split, the real inputs and the evaluation
    settings that shape them; no adapter, so every run of the prompt shares them."""
    ev = cfg.eval
    shaping = (
        "max_samples",
        "max_real_inputs",
        "max_turns",
        "max_tokens",
        "env_max_tokens",
        "teacher_samples",
        "sample_temperature",
    )
    key = fingerprint(
        {
            "version": REFERENCE_VERSION,
            "synth": synth_hash(cfg),
            "split": dataclasses.asdict(cfg.split),
            "eval": {name: getattr(ev, name) for name in shaping},
            "target": model_identity(cfg.models.target),
            "real_inputs": real_inputs,
        }
    )
    return f"{prompt_root(spec)}/references/{key}"


def validation_prefix(spec: PromptSpec, cfg: GenPIConfig) -> str:
    """One run's figures on the validation split, which a sweep chooses its run by."""
    key = fingerprint({"run": run_hash(cfg), "eval": eval_hash(cfg), "set": "val"})
    return f"{prompt_root(spec)}/eval/{key}"


def selection_prefix(spec: PromptSpec, runs: list[GenPIConfig]) -> str:
    """The choice among a sweep's runs of one prompt."""
    key = fingerprint({"runs": [run_hash(r) for r in runs], "eval": eval_hash(runs[0])})
    return f"{prompt_root(spec)}/selection/{key}"


def published_version(spec: PromptSpec, cfg: GenPIConfig) -> str:
    """The immutable version a passing adapter is published under (:mod:`genpi.registry`)."""
    return f"{spec.prompt_hash[:8]}-{run_hash(cfg)[:8]}"


def batch_prefix(specs: list[PromptSpec], cfg: GenPIConfig, real_inputs: dict[str, list[str]]) -> str:
    runs = [run_hash(r) for r in cfg.train_runs()]
    return "batches/" + fingerprint(
        {
            "prompts": [s.prompt_hash for s in specs],
            "run": runs[0] if len(runs) == 1 else runs,
            "eval": eval_hash(cfg),
            "user_inputs": real_inputs,
        }
    )
