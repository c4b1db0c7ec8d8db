"""Configuration: dataclasses that load from YAML and flags, validated in one place.

The dataclass defaults are the paper's settings for a GPU cluster (1,000 pseudo inputs,
LoRA r=16/alpha=32, lr 1e-4 cosine, 10 epochs, effective batch 32). The ``local`` profile
sizes them for a 2-core CPU machine. Precedence: defaults < profile < YAML file < flags.

Every field carries its help text and its allowed values in ``metadata``; :func:`validate`
checks all of them and raises :class:`~genpi.errors.ConfigError` naming the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from genpi.errors import ConfigError, GenPIError, nearest, short_repr, unpaired_surrogate

METHODS = ("genpi", "sft", "prepend", "seqkd-kld", "onpolicy-kl", "genpi-kld")
PG_METHODS = ("genpi", "genpi-kld")  # the methods with a Prompt Generation term, swept over train.lambdas
# The settings each method reads besides the shared ones; a run's key leaves out the others.
METHOD_SETTINGS = {
    "genpi": ("pg_lambda", "pg_fraction"),
    "sft": (),
    "prepend": ("prepend_fraction",),
    "seqkd-kld": ("kl_weight",),
    "genpi-kld": ("pg_lambda", "pg_fraction", "kl_weight"),
    "onpolicy-kl": ("onpolicy_warmup", "onpolicy_max_tokens", "onpolicy_temperature", "kl_top_k"),
}


def _f(
    default: Any,
    help: str,
    *,
    choices: tuple | None = None,
    low: float | None = None,
    high: float | None = None,
    factory: bool = False,
) -> Any:
    """A dataclass field with its help text and allowed values."""
    meta = {"help": help, "choices": choices, "low": low, "high": high}
    if factory:
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    """One model role: which model, on which backend and device, how many replicas."""

    name: str = _f(
        "smollm2-135m-instruct",
        "registry name (smollm2-135m-instruct, tiny-random-llama), "
        "a local Hugging Face model folder, or an s3:// model folder",
    )
    backend: str = _f(
        "hf",
        "inference backend; auto picks vllm where it is installed (make install-vllm)",
        choices=("hf", "vllm", "auto"),
    )
    python: str = _f(
        "",
        "interpreter for this role's engine actors (a virtual environment with vLLM); "
        "empty: the job's own, or the checkout's .venv-vllm for backend vllm",
    )
    device: str = _f("auto", "auto picks cuda when the actor has a GPU, else cpu", choices=("auto", "cpu", "cuda"))
    dtype: str = _f("bfloat16", "weights and compute dtype", choices=("bfloat16", "float16", "float32"))
    batch_size: int = _f(32, "conversations per generate call", low=1, high=4096)
    max_context: int = _f(0, "token limit for prompt + output; 0 uses the model's own context length", low=0)
    num_gpus: float = _f(1.0, "GPUs per engine actor (0 runs the engine on CPU)", low=0)
    num_cpus: float = _f(
        1.0,
        "CPUs reserved per engine actor (scaled down when both roles' engines "
        "together ask for more than the cluster has)",
        low=0,
    )
    replicas: int = _f(1, "engine actors for this role; work is split across them", low=1, high=1024)
    threads: int = _f(0, "torch CPU threads per actor; 0 follows its CPU reservation", low=0)
    restarts: int = _f(
        2,
        "times a dead engine actor is restarted, and its unfinished calls retried, before the prompt it served fails",
        low=0,
        high=100,
    )
    call_timeout_s: float = _f(
        1800.0,
        "seconds an engine call may take before its actor counts as hung: it is "
        "killed and restarted like a dead one (models.<role>.restarts), and the call retried; "
        "0 waits forever",
        low=0,
    )
    prefix_sharing: bool = _f(
        True,
        "compute the KV cache of a batch's shared prefix (the prompt) once "
        "instead of once per conversation (hf backend)",
    )
    max_lora_rank: int = _f(
        0,
        "vllm backend: the largest LoRA rank it serves per request; 0 starts the job's engines "
        "without LoRA (synthesis needs none, and LoRA costs about 30 percent of CPU throughput) "
        "and the server's with rank 16",
        low=0,
        high=512,
    )
    kv_cache_gb: float = _f(2.0, "KV cache space on CPU, GiB (vllm backend)", low=0.5)
    gpu_memory_utilization: float = _f(0.85, "share of GPU memory vLLM may take (vllm backend)", low=0.05, high=1)


@dataclass
class ModelsConfig:
    """The two model roles of GenPI."""

    generator: ModelConfig = _f(ModelConfig, "writes pseudo inputs and reasons (70B class in the paper)", factory=True)
    target: ModelConfig = _f(
        ModelConfig,
        "the model that gets the adapter; also student, teacher and both role-play personas (8B class in the paper)",
        factory=True,
    )


@dataclass
class SynthConfig:
    """Data synthesis from the prompt alone (paper section 5 and appendix A)."""

    num_inputs: int = _f(1000, "pseudo user inputs to keep per prompt, after deduplication", low=1)
    min_inputs: int = _f(8, "fail the prompt if fewer unique inputs than this could be generated", low=1)
    inputs_per_request: int = _f(5, "inputs the generator is asked to write per request", low=1, high=50)
    demos_per_request: int = _f(5, "example inputs shown to the generator per request", low=0, high=50)
    near_duplicate_threshold: float = _f(
        0.95,
        "drop a pseudo input whose MiniLM embedding has at least this "
        "cosine similarity to one kept before or to an example input; 0 "
        "keeps near duplicates",
        low=0,
        high=1,
    )
    max_input_rounds: int = _f(8, "generation rounds before giving up on reaching num_inputs", low=1)
    input_temperature: float = _f(1.0, "sampling temperature for pseudo inputs", low=0, high=5)
    input_top_p: float = _f(0.9, "nucleus threshold for pseudo inputs", low=0.01, high=1)
    input_max_tokens: int = _f(512, "max new tokens per input-generation request", low=8)
    output_max_tokens: int = _f(512, "max new tokens of student/teacher single-turn outputs", low=8)
    reason_temperature: float = _f(0.7, "sampling temperature for reasons", low=0, high=5)
    reason_top_p: float = _f(0.9, "nucleus threshold for reasons", low=0.01, high=1)
    reason_max_tokens: int = _f(256, "max new tokens of a reason", low=8)
    reason_fraction: float = _f(
        1.0,
        "share of the inputs that get a reason from the generator, hence a Prompt "
        "Generation example (picked by a hash of the id; the others are trained on their "
        "role-played turns only). The paper explains every input; a run that trains on a "
        "few PG examples (train.pg_fraction) needs only that many reasons",
        low=0,
        high=1,
    )
    reason_sentences: int = _f(5, "sentences a reason is asked to have", low=1, high=20)
    agent_max_tokens: int = _f(512, "max new tokens of an agent turn in role play", low=8)
    env_max_tokens: int = _f(512, "max new tokens of an environment turn in role play", low=8)
    max_turns: int = _f(0, "cap on role-play turns for every prompt; 0 uses each prompt's max_turns", low=0, high=50)
    agent_resamples: int = _f(
        4,
        "samples drawn (in one batched call) for a role-played agent turn that breaks "
        "the prompt's action format; the first in format replaces it, so a target that "
        "follows its prompt only some of the time still yields training turns (0: greedy "
        "turns only, as in the paper)",
        low=0,
        high=64,
    )
    resample_temperature: float = _f(0.8, "sampling temperature of those samples", low=0.01, high=5)
    resample_turns: int = _f(
        1,
        "agent turns of an episode, from the first, that are resampled (the first decides "
        "whether a record teaches anything; a later off-format turn is cut by the filter "
        "and leaves the turns before it)",
        low=1,
        high=50,
    )
    part_size: int = _f(64, "records per stored part file; finished parts survive a failure", low=1)
    prompts_in_flight: int = _f(
        2,
        "prompts synthesized at once on the shared engines, so the generator "
        "and target pools both have work (placement only: not in the synthesis key)",
        low=1,
        high=64,
    )
    filter_off_format: bool = _f(
        True,
        "end a role-played conversation at its first agent turn that breaks the "
        "prompt's action format, so such turns are never trained on (counted in the "
        "quality report)",
    )
    seed: int = _f(0, "seed for sampling", low=0)


@dataclass
class SplitConfig:
    """Train / validation / test split of the synthesized records, derived from record ids.

    Part of the synthesis key: synthesis role-plays only the records training reads.
    """

    val_fraction: float = _f(
        0.1, "share of records held out for validation (lambda and method choice)", low=0, high=0.5
    )
    test_fraction: float = _f(0.1, "share of records held out for the final evaluation", low=0, high=0.5)
    seed: int = _f(0, "seed of the split", low=0)


@dataclass
class TrainConfig:
    """One LoRA adapter per prompt, trained with ``method`` (the paper's joint loss
    L = (1 - pg_lambda) * L_SFT + pg_lambda * L_PG by default)."""

    method: str = _f(
        "genpi",
        "training objective: genpi (SFT + pg_lambda * Prompt Generation), sft (role-played "
        "conversations only), prepend (SFT with the prompt before prepend_fraction of the examples), "
        "seqkd-kld (SFT plus KL to the teacher's distributions with the prompt), onpolicy-kl (SFT "
        "warm-up, then reverse top-k KL to the model with the prompt on the adapter's own samples), genpi-kld "
        "(genpi whose SFT term adds seqkd-kld's KL)",
        choices=METHODS,
    )
    prepend_fraction: float = _f(
        1.0,
        "share of the records trained with the prompt before them (method prepend; "
        "the paper's baselines use 1.0 and 0.5)",
        low=0,
        high=1,
    )
    kl_weight: float = _f(1.0, "weight of the KL term (methods seqkd-kld, genpi-kld)", low=0)
    onpolicy_warmup: float = _f(
        0.5, "share of the steps trained with SFT before on-policy steps (method onpolicy-kl)", low=0, high=1
    )
    onpolicy_max_tokens: int = _f(64, "tokens the adapter samples per reply (method onpolicy-kl)", low=1)
    onpolicy_temperature: float = _f(
        1.0, "sampling temperature of those replies (method onpolicy-kl)", low=0.01, high=5
    )
    kl_top_k: int = _f(
        20,
        "student tokens kept per position in the reverse KL, the rest in one tail bucket (method onpolicy-kl)",
        low=1,
    )
    pg_lambda: float = _f(
        0.3,
        "weight of the Prompt Generation loss; SFT gets 1 - pg_lambda (the authors' "
        "scripts weight SFT by 0.7, i.e. pg_lambda 0.3)",
        low=0,
        high=1,
    )
    methods: list[str] = _f(
        list, "sweep: one run per method (overrides method; empty: just method)", choices=METHODS, factory=True
    )
    lambdas: list[float] = _f(
        list,
        "sweep: one genpi run per value (overrides pg_lambda; empty: just pg_lambda; "
        "the paper profile sweeps 0.3, 0.5, 0.7)",
        low=0,
        high=1,
        factory=True,
    )
    seeds: list[int] = _f(
        list,
        "sweep: one run per seed (overrides seed; empty: just seed; the paper profile trains 0, 1, 2)",
        low=0,
        factory=True,
    )
    pg_fraction: float = _f(
        1.0,
        "share of the records' Prompt Generation examples used, spread evenly over the "
        "steps (a PG example carries the whole prompt as its target, ~5x an SFT example's "
        "tokens; the paper uses every one)",
        low=0,
        high=1,
    )
    lora_r: int = _f(16, "LoRA rank", low=1, high=1024)
    lora_alpha: int = _f(32, "LoRA alpha", low=1)
    lora_dropout: float = _f(0.05, "LoRA dropout", low=0, high=0.9)
    lora_layers: int = _f(
        0,
        "put LoRA on the top N transformer layers only (backward then stops below "
        "them); 0 = every layer, as in the paper",
        low=0,
    )
    target_modules: str = _f(
        "all-linear",
        "modules that get LoRA: all-linear (every linear but the LM head) or a comma-separated list of module names",
    )
    quantization: str = _f(
        "auto",
        "nf4 = QLoRA 4-bit base weights (CUDA only); auto = nf4 on CUDA, none on CPU",
        choices=("auto", "nf4", "none"),
    )
    learning_rate: float = _f(1e-4, "peak learning rate", low=0, high=1)
    loraplus_lr_ratio: float = _f(
        1.0,
        "LoRA+: the LoRA B matrices train at this multiple of the learning rate (1 = plain LoRA; "
        "Hayou et al. 2024 use 16), so facts of the prompt are learned in fewer steps",
        low=1,
    )
    lr_scheduler: str = _f("cosine", "learning-rate schedule after warmup", choices=("cosine", "linear", "constant"))
    warmup_ratio: float = _f(0.03, "share of steps for linear warmup", low=0, high=0.5)
    epochs: int = _f(10, "passes over the training records", low=1, high=1000)
    min_steps: int = _f(
        0,
        "optimizer steps a run takes at least: passes are added (the last one possibly "
        "partial) until it has, so a prompt whose format filter leaves few records still gets "
        "enough updates; 0 = just epochs",
        low=0,
    )
    batch_size: int = _f(32, "effective batch size (records per optimizer step)", low=1)
    micro_batch_size: int = _f(4, "records per forward pass; gradients accumulate up to batch_size", low=1)
    max_grad_norm: float = _f(1.0, "gradient-norm clip (the paper: 1.0 OS, 0.5 web)", low=0)
    weight_decay: float = _f(0.0, "AdamW weight decay", low=0, high=1)
    max_seq_len: int = _f(4096, "token limit of a training sequence, capped by the model's context", low=64)
    gradient_checkpointing: bool = _f(True, "recompute activations in backward to save memory")
    num_gpus: float = _f(1.0, "GPUs per training run (0 on CPU-only clusters)", low=0)
    num_cpus: float = _f(1.0, "CPUs reserved per training run", low=0)
    max_failures: int = _f(2, "times Ray Train restarts a run's failed worker from its last checkpoint", low=0)
    timeout_s: float = _f(
        21600.0,
        "seconds a training run may take; past it the run is cancelled and its prompt fails "
        "(finished runs and checkpoints stay); 0: no limit",
        low=0,
    )
    checkpoint_steps: int = _f(
        10,
        "save the run's state every N optimizer steps as well as after each epoch (0: each epoch only); "
        "a stopped run resumes from its newest checkpoint",
        low=0,
    )
    threads: int = _f(
        0, "torch CPU threads of a training run; 0 follows the run's CPU reservation (train.num_cpus)", low=0
    )
    seed: int = _f(0, "seed for LoRA init, dropout and shuffling", low=0)


@dataclass
class EvalConfig:
    """Evaluation of each adapter (no prompt) against the teacher (prompt) and the base (neither)."""

    max_samples: int = _f(100, "held-out test inputs evaluated per prompt", low=1)
    max_real_inputs: int = _f(
        0, "user inputs (--eval-inputs) evaluated per prompt; 0: as many as eval.max_samples", low=0
    )
    timeout_s: float = _f(
        7200.0,
        "seconds a selection or evaluation task may take; past it the task is cancelled and its "
        "prompt fails; 0: no limit",
        low=0,
    )
    max_tokens: int = _f(512, "max new tokens of an evaluated agent turn", low=8)
    env_max_tokens: int = _f(512, "max new tokens of an environment turn in evaluation episodes", low=8)
    max_turns: int = _f(0, "agent turns per evaluation episode; 0 uses each prompt's max_turns", low=0, high=50)
    top_k: int = _f(
        20, "teacher tokens kept per position for the top-k KL (the rest form one tail bucket)", low=1, high=1000
    )
    min_retention: float = _f(
        0.8,
        "publish an adapter only if its action-format validity is at least this share of the teacher's",
        low=0,
        high=1,
    )
    min_gap_closed: float = _f(
        0.5,
        "publish an adapter only if it closes at least this share of the "
        "teacher-forced NLL gap between base and teacher",
        low=0,
        high=1,
    )
    teacher_samples: int = _f(
        8,
        "first replies the teacher samples per input (temperature sample_temperature, "
        "seeded); a system's first action agrees when it is among the sampled actions "
        "(0: no sampling)",
        low=0,
        high=64,
    )
    sample_temperature: float = _f(0.7, "temperature of those samples", low=0.01, high=5)
    latency_turns: int = _f(5, "turns of the timed episode in the efficiency measurement", low=1, high=50)
    latency_tokens: int = _f(32, "tokens generated per timed turn in the efficiency measurement", low=1)
    batch_size: int = _f(16, "conversations per generate call in evaluation", low=1)
    num_gpus: float = _f(1.0, "GPUs per evaluation task (0 on CPU-only clusters)", low=0)
    num_cpus: float = _f(1.0, "CPUs reserved per evaluation task", low=0)
    threads: int = _f(
        0, "torch CPU threads of an evaluation task; 0 follows the task's CPU reservation (eval.num_cpus)", low=0
    )


@dataclass
class ServeConfig:
    """The OpenAI-compatible adapter server."""

    host: str = _f("127.0.0.1", "address the server binds")
    port: int = _f(8000, "port the server binds", low=1, high=65535)
    api_key: str = _f("", "bearer key clients must send; empty uses $GENPI_API_KEY, and no key when that is unset")
    replicas: int = _f(1, "model replicas (each holds the base model once and its adapters)", low=1, high=1024)
    num_cpus: float = _f(
        2.0, "CPUs reserved per model replica (its torch threads unless models.target.threads says)", low=0
    )
    num_gpus: float = _f(0.0, "GPUs per model replica", low=0)
    backend: str = _f(
        "auto",
        "engine of the model replicas (model, dtype, context, LoRA rank from models.target): hf "
        "(transformers), vllm (vLLM's async engine on its own interpreter; make install-vllm on CPU), "
        "auto = vllm when a replica has a GPU (serve.num_gpus > 0) and vLLM is found, else hf",
        choices=("hf", "vllm", "auto"),
    )
    max_adapters: int = _f(
        8,
        "adapters and fallback prompts held per replica; the least recently used is "
        "unloaded (its memory freed) past this",
        low=1,
        high=1024,
    )
    merged_adapters: int = _f(
        1,
        "adapters a replica also keeps merged into a copy of the weights, for batches "
        "whose requests all name one adapter (the base model's speed; each copy costs "
        "the adapted layers' memory); 0: never merge (hf backend; vLLM runs its own LoRA path)",
        low=0,
        high=64,
    )
    batch_window_ms: float = _f(
        40.0,
        "requests arriving within this window of the first go to the engine as "
        "one batch (mixed adapters in one forward; hf backend: vLLM batches continuously)",
        low=0,
        high=1000,
    )
    refresh_s: float = _f(
        2.0,
        "how old the server's view of the registry may be: a newly published adapter "
        "is served at most this long after it appears",
        low=0,
    )
    max_tokens: int = _f(256, "max new tokens of a reply when the request names none", low=1)
    max_body_kib: int = _f(1024, "largest request body accepted, KiB (larger: 413)", low=1)


@dataclass
class StoreConfig:
    """Where artifacts live: a local folder or s3://bucket/prefix."""

    url: str = _f("artifacts", "artifact store: a folder path or s3://bucket/prefix")
    endpoint_url: str = _f("", "S3 endpoint (e.g. http://127.0.0.1:8333); empty uses AWS settings")
    region: str = _f("", "S3 region; empty uses AWS settings")
    retry_s: float = _f(
        60.0,
        "seconds an S3 request that fails for a passing reason (server down, timeout, "
        "5xx, throttling) is retried with backoff before the job fails",
        low=0,
    )


@dataclass
class RayConfig:
    """How the job finds or starts its Ray cluster."""

    address: str = _f(
        "",
        "Ray cluster to join; empty joins RAY_ADDRESS or the job-submit cluster, "
        "else starts a local cluster on 127.0.0.1",
    )
    num_cpus: int = _f(0, "CPUs of a started local cluster; 0 uses every core", low=0)
    temp_dir: str = _f("", "temp folder of a started local cluster; empty picks a private one")
    dashboard: bool = _f(
        True,
        "start the Ray dashboard with a local cluster (on 127.0.0.1:8265, "
        "behind the cluster's token auth); false starts none",
    )


@dataclass
class GenPIConfig:
    """Everything a GenPI run depends on."""

    models: ModelsConfig = _f(ModelsConfig, "model roles", factory=True)
    synth: SynthConfig = _f(SynthConfig, "data synthesis", factory=True)
    split: SplitConfig = _f(SplitConfig, "train / validation / test split", factory=True)
    train: TrainConfig = _f(TrainConfig, "adapter training", factory=True)
    eval: EvalConfig = _f(EvalConfig, "evaluation", factory=True)
    serve: ServeConfig = _f(ServeConfig, "serving", factory=True)
    store: StoreConfig = _f(StoreConfig, "artifact store", factory=True)
    ray: RayConfig = _f(RayConfig, "Ray cluster", factory=True)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON/YAML-able)."""
        return dataclasses.asdict(self)

    def train_runs(self) -> list[GenPIConfig]:
        """One config per training run of the sweep (methods × lambdas for PG methods × seeds), each
        with its own method, pg_lambda and seed and no sweep lists; just this run without a sweep."""
        t = self.train
        runs: dict[tuple[str, float, int], GenPIConfig] = {}
        for method in t.methods or [t.method]:
            for pg_lambda in (t.lambdas or [t.pg_lambda]) if method in PG_METHODS else [t.pg_lambda]:
                for seed in t.seeds or [t.seed]:
                    train = dataclasses.replace(
                        t, method=method, pg_lambda=pg_lambda, seed=seed, methods=[], lambdas=[], seeds=[]
                    )
                    run = dataclasses.replace(self, train=train)
                    runs.setdefault((method, pg_lambda, seed), run)
        return list(runs.values())


# ---------------------------------------------------------------- profiles
PROFILES: dict[str, dict[str, Any]] = {
    # The dataclass defaults: the paper's settings, for a GPU cluster, sweeping the paper's lambdas,
    # each with 3 seeds (selection reports each lambda's mean ± std over them).
    "paper": {"train": {"lambdas": [0.3, 0.5, 0.7], "seeds": [0, 1, 2]}},
    # Sized for 2 CPU cores: the main job over the three shipped prompts in 8 to 15 minutes (19 to 23 on
    # the slowest CPU seen).
    # The vLLM engine where `make install` built it (about 2x the hf backend's synthesis speed on
    # these long prompts). Fewer, shorter generations; reasons only for the few records whose PG
    # examples are trained; LoRA without dropout (random masks cost ~30% of a CPU step) on every
    # layer, as in the paper (the top 15 alone trained ~1.7x faster per step, but over three seeds
    # kept shell's format on 9-11 of 16 inputs against 12, and was less faithful on held-out prompts).
    "local": {
        "models": {
            "generator": {"batch_size": 64, "num_gpus": 0, "num_cpus": 2, "backend": "auto"},
            "target": {"batch_size": 64, "num_gpus": 0, "num_cpus": 2, "backend": "auto"},
        },
        "synth": {
            "num_inputs": 36,
            "min_inputs": 8,
            "max_input_rounds": 6,
            "inputs_per_request": 5,
            "input_max_tokens": 128,
            "output_max_tokens": 80,
            "reason_max_tokens": 48,
            "reason_fraction": 0.35,
            "agent_max_tokens": 80,
            "env_max_tokens": 48,
            "max_turns": 2,
            "part_size": 40,
            # one engine for both roles on 2 cores: a second prompt in flight only competes for it
            "prompts_in_flight": 1,
        },
        # 16 test inputs, 4 validation, 16 training
        "split": {"val_fraction": 0.1, "test_fraction": 0.45},
        # PG for 4% of the record visits (each costs ~10 s here), so each counts more: lambda 0.7
        # (held-out SQL prompt, test split: format 75% and NLL gap closed 38% vs 50% and 28% at 0.3).
        # Micro-batches of one record: no padding, ~5% faster per step on CPU, same loss.
        "train": {
            "epochs": 5,
            "min_steps": 22,
            "batch_size": 4,
            "micro_batch_size": 1,
            "max_seq_len": 2048,
            "num_gpus": 0,
            "num_cpus": 2,
            "gradient_checkpointing": False,
            "learning_rate": 7e-4,
            "lora_dropout": 0.0,
            "pg_fraction": 0.04,
            "pg_lambda": 0.7,
        },
        # Episodes of 3 agent turns on 16 test inputs and 8 user inputs; the teacher's 8 samples per
        # test input (the default) come from the references, drawn on vLLM while synthesizing.
        "eval": {
            "num_gpus": 0,
            "num_cpus": 2,
            "max_turns": 3,
            "max_tokens": 80,
            # most observations ran to 48 tokens; 32 say what happened and cut the environment's
            # share of an episode (it reads ~1.6k tokens of worked examples per step on the hf engine)
            "env_max_tokens": 32,
            "max_samples": 16,
            "max_real_inputs": 8,
            "latency_turns": 3,
            "latency_tokens": 8,
            "batch_size": 32,  # every set's adapter episodes in one batch
        },
    },
}


# ---------------------------------------------------------------- building and validating
def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _is_section(f: dataclasses.Field, cls: type) -> bool:
    return dataclasses.is_dataclass(typing.get_type_hints(cls)[f.name])


def _merge(obj: Any, updates: dict[str, Any], path: str, origin: str) -> None:
    """Apply a nested mapping onto a config object in place."""
    if not isinstance(updates, dict):
        raise ConfigError(f"{origin}: '{path or 'the top level'}' must be a mapping, got {short_repr(updates)}")
    fields = _fields(type(obj))
    for key, value in updates.items():
        name = str(key).replace("-", "_")
        where = f"{path}.{name}" if path else name
        if name not in fields:
            close = nearest(name, fields)
            raise ConfigError(
                f"{origin}: unknown config key '{where}'"
                + (f"; did you mean '{close}'?" if close else "")
                + f"; allowed keys here: {', '.join(fields)}"
            )
        if _is_section(fields[name], type(obj)):
            _merge(getattr(obj, name), value, where, origin)
        else:
            setattr(obj, name, _coerce(value, typing.get_type_hints(type(obj))[name], where, origin))


def _coerce(value: Any, kind: Any, where: str, origin: str) -> Any:
    """Convert a YAML or flag value to the field's type, or name the field and the expected type.

    A list field takes a YAML list or a comma-separated string (``--train.lambdas 0.3,0.5``)."""
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        items = [x.strip() for x in value.split(",") if x.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(
                f"{origin}: '{where}' must be a list of {item.__name__} (YAML list or comma-separated), "
                f"got {short_repr(value)}"
            )
        return [_coerce(x, item, f"{where}[{k}]", origin) for k, x in enumerate(items)]
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "on"):
                return True
            if str(value).lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool) or not math.isfinite(number := float(value)):
                raise ValueError
            return number
        if kind is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return "" if value is None else str(value)
    except (TypeError, ValueError, OverflowError):
        expected = "a finite number" if kind is float else kind.__name__
        raise ConfigError(f"{origin}: '{where}' must be {expected}, got {short_repr(value)}") from None
    return value


def validate(cfg: GenPIConfig) -> GenPIConfig:
    """Check every field against its allowed values, then the rules that span fields."""

    def walk(obj: Any, path: str) -> None:
        for f in dataclasses.fields(obj):
            value, where = getattr(obj, f.name), f"{path}.{f.name}" if path else f.name
            if dataclasses.is_dataclass(value):
                walk(value, where)
                continue
            meta = f.metadata
            if isinstance(value, list):
                for k, item in enumerate(value):
                    check(meta, item, f"{where}[{k}]")
            else:
                check(meta, value, where)

    def check(meta: Any, value: Any, where: str) -> None:
        if meta.get("choices") and value not in meta["choices"]:
            raise ConfigError(
                f"config '{where}' is {short_repr(value)}; allowed: {', '.join(map(str, meta['choices']))}"
            )
        if meta.get("low") is not None and value < meta["low"]:
            raise ConfigError(
                f"config '{where}' is {short_repr(value)}; it must be at least {meta['low']}"
                + (f" and at most {meta['high']}" if meta.get("high") is not None else "")
            )
        if meta.get("high") is not None and value > meta["high"]:
            raise ConfigError(
                f"config '{where}' is {short_repr(value)}; it must be at most {meta['high']}"
                + (f" and at least {meta['low']}" if meta.get("low") is not None else "")
            )

    walk(cfg, "")
    if cfg.synth.min_inputs > cfg.synth.num_inputs:
        raise ConfigError(
            f"config 'synth.min_inputs' ({cfg.synth.min_inputs}) must not exceed "
            f"'synth.num_inputs' ({cfg.synth.num_inputs})"
        )
    if cfg.train.micro_batch_size > cfg.train.batch_size:
        raise ConfigError(
            f"config 'train.micro_batch_size' ({cfg.train.micro_batch_size}) must not exceed "
            f"'train.batch_size' ({cfg.train.batch_size})"
        )
    if cfg.train.quantization == "nf4" and cfg.train.num_gpus == 0:
        raise ConfigError(
            "config 'train.quantization' is nf4, which needs CUDA (bitsandbytes NF4 on CPU "
            "silently stops gradients); set train.num_gpus >= 1 or train.quantization to none"
        )
    for role in ("generator", "target"):
        model = getattr(cfg.models, role)
        if model.device == "cuda" and model.num_gpus == 0:
            raise ConfigError(
                f"config 'models.{role}.device' is cuda but 'models.{role}.num_gpus' is 0; "
                f"give the actor a GPU or use device auto/cpu"
            )
    if cfg.store.url.strip() == "":
        raise ConfigError("config 'store.url' is empty; give a folder path or s3://bucket/prefix")
    return cfg


def load_config(
    profile: str = "local", yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> GenPIConfig:
    """Build a validated config: defaults, then ``profile``, then the YAML file, then ``overrides``.

    ``overrides`` is a flat mapping of dotted keys (``{"synth.num_inputs": 64}``) as flags give them.
    """
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; allowed: {', '.join(PROFILES)}")
    cfg = GenPIConfig()
    _merge(cfg, PROFILES[profile], "", f"profile {profile}")
    if yaml_path:
        path = Path(yaml_path)
        if not path.is_file():
            what = "is a folder" if path.is_dir() else "does not exist"
            raise ConfigError(f"config file {path} {what}; pass an existing YAML file to --config")
        data = parse_yaml(read_text_file(path, ConfigError), f"config file {path}", ConfigError) or {}
        _merge(cfg, data, "", f"config file {path}")
    for dotted, value in (overrides or {}).items():
        nested: dict[str, Any] = {}
        cursor = nested
        parts = dotted.split(".")
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = value
        _merge(cfg, nested, "", f"flag --{dotted.replace('_', '-')}")
    return validate(cfg)


def config_from_dict(data: dict[str, Any]) -> GenPIConfig:
    """Rebuild a config from :meth:`GenPIConfig.to_dict` output (exact round trip)."""
    cfg = GenPIConfig()
    _merge(cfg, data, "", "config dict")
    return validate(cfg)


# ---------------------------------------------------------------- flags
def add_config_flags(parser: argparse.ArgumentParser, sections: tuple[str, ...] = ()) -> None:
    """Add one ``--section.field`` flag per config field, with its help and default (only those
    under the ``sections`` named, when any are: ``"serve"``, ``"models.target"``)."""
    defaults = GenPIConfig()

    def wanted(where: str) -> bool:  # a chosen section, inside one, or on the way to one
        return not sections or any(f"{where}.".startswith(f"{s}.") or s.startswith(f"{where}.") for s in sections)

    def walk(obj: Any, path: str, group: argparse._ArgumentGroup | None) -> None:
        for f in dataclasses.fields(obj):
            value, where = getattr(obj, f.name), f"{path}.{f.name}" if path else f.name
            if dataclasses.is_dataclass(value):
                if not wanted(where):
                    continue
                walk(value, where, parser.add_argument_group(f"{where} ({f.metadata['help']})"))
                continue
            meta = f.metadata
            allowed = f"; one of: {', '.join(map(str, meta['choices']))}" if meta.get("choices") else ""
            assert group is not None
            group.add_argument(
                f"--{where.replace('_', '-')}",
                dest=f"cfg:{where}",
                default=None,
                metavar="A,B,..." if isinstance(value, list) else type(value).__name__.upper(),
                help=f"{meta['help']}{allowed} (default: {value!r}, before the profile)",
            )

    walk(defaults, "", None)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The config flags a user actually set, as dotted keys."""
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}


# ---------------------------------------------------------------- reading a user's files
MAX_FILE_BYTES = 1 << 20  # a prompt or config file; far above any real one, small enough to parse at once
MAX_DEPTH = 100  # brackets open at once in a YAML document
MAX_NODES = 100_000  # values a YAML document may expand to, each alias counted at every use


def read_text_file(
    path: Path, error: type[GenPIError], *, limit: int = MAX_FILE_BYTES, fix: str = "re-save it with UTF-8 encoding"
) -> str:
    """A user's text file: at most ``limit`` bytes, UTF-8 with or without a BOM, no NUL bytes.

    Every problem raises ``error`` naming the file; newlines come back as ``\\n``.
    """
    try:
        size = path.stat().st_size
        if size > limit:
            raise error(
                f"{path}: is {size:,} bytes, more than the {limit:,} a file here may have; "
                "check that it is the right file"
            )
        raw = path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e}); check the path and its permissions") from None
    if b"\x00" in raw:
        raise error(f"{path}: looks like a binary file (contains NUL bytes); it must be UTF-8 text")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(
            f"{path}: is not UTF-8 text (invalid byte 0x{raw[e.start]:02x} at offset {e.start}); {fix}"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def parse_yaml(text: str, src: str, error: type[GenPIError], *, what: str = "YAML", line_offset: int = 0) -> Any:
    """``yaml.safe_load`` that turns every failure (syntax, nesting too deep, an alias bomb, a value
    YAML cannot build, text that is not Unicode) into ``error``."""
    label = f"{src}: {what}" if what != "YAML" else src
    try:
        # PyYAML takes time quadratic in the depth of [ ] and { } nesting: refuse deep nesting first
        depth = max(itertools.accumulate(1 if c in "[{" else -1 for c in re.sub(r"[^][{}]+", "", text)), default=0)
        if depth > MAX_DEPTH:
            raise RecursionError
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
        _check_document(data)
        return data
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1 + line_offset}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        if isinstance(e, _DuplicateYAMLKey):
            raise error(
                f"{label}{where}: {problem} (first at line {e.first_line + 1 + line_offset}); keep one of them"
            ) from None
        raise error(f"{label} is not valid YAML{where}: {problem}; fix the syntax") from None
    except RecursionError:
        raise error(f"{label} is nested too deeply to read; flatten it") from None
    except _TooLarge as e:
        raise error(f"{label} {e}; write the values out instead of repeating aliases") from None
    except _NotText as e:
        raise error(f"{label} {e}") from None
    except (ValueError, OverflowError) as e:  # a date like 2024-02-30, an integer of thousands of digits
        raise error(f"{label} holds a value YAML cannot read ({_unreadable(e)}); put the value in quotes") from None


def parse_json(text: str, src: str, error: type[GenPIError], fix: str = "fix the syntax") -> Any:
    """``json.loads`` that turns every failure (syntax, nesting too deep, a number too long to read,
    text that is not Unicode) into ``error`` naming ``src``."""
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys)
        _check_document(data)
        return data
    except json.JSONDecodeError as e:
        raise error(f"{src}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}; {fix}") from None
    except RecursionError:
        raise error(f"{src}: JSON is nested too deeply to read; flatten it") from None
    except _DuplicateKey as e:
        raise error(f"{src}: JSON {e}; keep one of them") from None
    except (_TooLarge, _NotText) as e:
        raise error(f"{src}: JSON {e}") from None
    except ValueError as e:  # an integer of thousands of digits
        raise error(f"{src}: JSON holds a number that cannot be read ({_unreadable(e)}); {fix}") from None


def _unreadable(e: Exception) -> str:
    """Why a value could not be read, without Python's advice to raise its digit limit."""
    text = str(e)
    return "an integer of more than 4,300 digits" if "digits" in text else text


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key written twice in one mapping (PyYAML keeps the last,
    silently; a merge key ``<<`` may still be overridden, as YAML intends)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: the constructor below says so
                continue
            if first is not key_node:
                raise _DuplicateYAMLKey(short_repr(key), first.start_mark.line, key_node.start_mark)
        return super().construct_mapping(node, deep)


class _DuplicateYAMLKey(yaml.constructor.ConstructorError):
    def __init__(self, key: str, first_line: int, mark: yaml.Mark) -> None:
        super().__init__(None, None, f"the key {key} appears twice in one mapping", mark)
        self.first_line = first_line  # 0-based, as PyYAML's marks


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict, refusing a key written twice (``json`` keeps the last, silently)."""
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise _DuplicateKey(f"has the key {short_repr(key)} twice in one object")
        data[key] = value
    return data


class _TooLarge(Exception):
    pass


class _NotText(Exception):
    pass


def _check_document(value: Any) -> int:
    """How many values ``value`` holds with shared (aliased) parts counted at every use; raises
    _TooLarge above MAX_NODES or for a value that contains itself, and _NotText for a string with
    an unpaired surrogate (an escape such as \\ud800, which no UTF-8 file can hold). Memoized: a
    bomb costs little."""
    sizes: dict[int, int | None] = {}

    def size(v: Any) -> int:
        if isinstance(v, str):
            if (at := unpaired_surrogate(v)) is not None:
                raise _NotText(
                    f"holds an unpaired surrogate escape (\\u{ord(v[at]):04x}) in {short_repr(v)}; "
                    "remove it or write the character it was meant to be"
                )
            return 1
        if not isinstance(v, (dict, list)):
            return 1
        if id(v) in sizes:
            if sizes[id(v)] is None:
                raise _TooLarge("contains itself (a recursive alias)")
            return sizes[id(v)]  # type: ignore[return-value]
        sizes[id(v)] = None
        items = [x for pair in v.items() for x in pair] if isinstance(v, dict) else v
        total = 1 + sum(size(x) for x in items)
        if total > MAX_NODES:
            raise _TooLarge(f"expands to more than {MAX_NODES:,} values")
        sizes[id(v)] = total
        return total

    return size(value)
