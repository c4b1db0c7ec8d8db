"""The training stage for one prompt: records → examples → adapter (PEFT format) → store.

Fixed lifecycle: find a finished run and return, or check that the prompt's PG examples fit
the training length, read the prompt's synthesized records, split them by id (train / val /
test; test records are never trained on), build the examples sized to the model's context,
train with the configured objective (checkpointed each epoch and every ``train.checkpoint_steps``
steps; a run that finds a checkpoint resumes from it), upload the adapter with its provenance (``genpi.json``), write metrics and
a summary, mark the run done and drop its checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from genpi import artifacts, telemetry
from genpi.chat import context_length
from genpi.config import PG_METHODS, GenPIConfig
from genpi.devices import cpu_threads
from genpi.errors import GenPIError
from genpi.fingerprint import fingerprint
from genpi.models import resolve_model
from genpi.prompt.spec import PromptSpec
from genpi.prompt.splits import TEST, TRAIN, VAL, assign_splits
from genpi.store import ArtifactStore
from genpi.train.checkpoints import Checkpoints, StoreCheckpoints
from genpi.train.examples import (
    EXAMPLES_VERSION,
    Example,
    ExampleReport,
    RecordExamples,
    build_examples,
    check_pg_fits,
)
from genpi.train.trainer import train_adapter

log = logging.getLogger(__name__)


def train_prompt(
    spec: PromptSpec, cfg: GenPIConfig, store: ArtifactStore, checkpoints: Checkpoints | None = None
) -> str:
    """Train (or find) the adapter of ``spec`` under ``cfg``; returns the run's store prefix.

    Checkpoints go to ``checkpoints`` (default: ``{run}/checkpoints/`` in the
    store), and a run that finds one resumes from it.
    """
    from transformers import AutoTokenizer

    prefix = artifacts.train_prefix(spec, cfg)
    if store.is_done(prefix):
        log.info("[%s] adapter found at %s", spec.name, store.location(f"{prefix}/adapter"))
        return prefix
    if cfg.train.threads or not torch.cuda.is_available():
        torch.set_num_threads(cpu_threads(cfg.train.threads))
    target = cfg.models.target
    folder = resolve_model(target.name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    context = context_length(folder, default=cfg.train.max_seq_len)
    max_len = min(cfg.train.max_seq_len, target.max_context or context, context)
    if cfg.train.method in PG_METHODS and cfg.train.pg_lambda > 0 and cfg.train.pg_fraction > 0:
        check_pg_fits(tokenizer, spec, max_len)
    records = store.get_jsonl(f"{artifacts.synth_prefix(spec, cfg)}/records.jsonl")
    split = assign_splits([r["id"] for r in records], cfg.split.val_fraction, cfg.split.test_fraction, cfg.split.seed)
    records = [r for r in records if split[r["id"]] != TEST]
    examples, report = stored_examples(spec, cfg, store, tokenizer, records, max_len)
    for note in report.notes:
        log.warning("[%s] %s", spec.name, note)
    usable = [(e, r) for e, r in zip(examples, records) if e.any()]
    train = [e for e, r in usable if split[r["id"]] == TRAIN]
    val = [e for e, r in usable if split[r["id"]] == VAL]
    if not train:
        why = "; ".join(report.notes) or "the split left no training records"
        raise GenPIError(
            f"{spec.source}: no training example could be built within {max_len} tokens "
            f"(train.max_seq_len={cfg.train.max_seq_len}): {why}; raise train.max_seq_len, "
            f"or check the synthesized data's quality.json"
        )
    lam = f", lambda {cfg.train.pg_lambda:.2f}" if cfg.train.method in PG_METHODS else ""
    log.info("[%s] training %s on %d records (%d validation)%s", spec.name, cfg.train.method, len(train), len(val), lam)
    with tempfile.TemporaryDirectory(prefix="genpi-adapter-") as tmp:
        adapter_dir = Path(tmp) / "adapter"
        metrics = train_adapter(
            cfg.train,
            target.name,
            target.dtype,
            train,
            val,
            adapter_dir,
            log=lambda line: log.info("[%s] %s", spec.name, line),
            checkpoints=checkpoints or StoreCheckpoints(store, f"{prefix}/checkpoints", Path(tmp)),
            on_step=functools.partial(telemetry.train_step, spec.name, prefix.rsplit("/", 1)[-1]),
        )
        provenance = provenance_of(spec, cfg)
        (adapter_dir / "genpi.json").write_text(json.dumps(provenance, indent=2), encoding="utf-8")
        store.upload_dir(adapter_dir, f"{prefix}/adapter")
    metrics["examples"] = vars(report)
    store.put_json(f"{prefix}/metrics.json", metrics)
    store.put_json(
        f"{prefix}/summary.json",
        {
            **provenance,
            "adapter": store.location(f"{prefix}/adapter"),
            "records": {"train": len(train), "val": len(val), "test": sum(v == TEST for v in split.values())},
            "final": metrics["final"],
            "seconds": metrics["seconds"],
            "trainable_params": metrics["trainable_params"],
        },
    )
    # vouches for the run's results, not for its checkpoints (dropped next)
    store.mark_done(prefix, {"run_hash": artifacts.run_hash(cfg)}, vouch=("adapter", "metrics.json", "summary.json"))
    store.delete_prefix(f"{prefix}/checkpoints")  # only a run still going needs them
    log.info("[%s] adapter saved at %s", spec.name, store.location(f"{prefix}/adapter"))
    return prefix


def stored_examples(
    spec: PromptSpec, cfg: GenPIConfig, store: ArtifactStore, tokenizer: Any, records: list[dict], max_len: int
) -> tuple[list[RecordExamples], ExampleReport]:
    """The records' examples, built and tokenized once per prompt, data, split and length, and
    stored beside the records: every run of a sweep reads them instead of tokenizing again."""
    key = fingerprint(
        {
            "version": EXAMPLES_VERSION,
            "split": dataclasses.asdict(cfg.split),
            "max_len": max_len,
            "target": artifacts.train_key(cfg)["target"],
        }
    )
    prefix = f"{artifacts.synth_prefix(spec, cfg)}/examples/{key}"
    if store.is_done(prefix):
        rows = store.get_jsonl(f"{prefix}/examples.jsonl")
        report = ExampleReport(**store.get_json(f"{prefix}/report.json"))
        return [
            RecordExamples(
                *(None if row[k] is None else Example(*row[k]) for k in ("sft", "pg", "teacher")),
                row["student_opening"],
                row["teacher_opening"],
            )
            for row in rows
        ], report
    examples, report = build_examples(tokenizer, records, spec, max_len)
    store.put_jsonl(
        f"{prefix}/examples.jsonl",
        [
            {
                **{
                    k: None if e is None else [e.input_ids, e.labels]
                    for k, e in (("sft", x.sft), ("pg", x.pg), ("teacher", x.teacher))
                },
                "student_opening": x.student_opening,
                "teacher_opening": x.teacher_opening,
            }
            for x in examples
        ],
    )
    store.put_json(f"{prefix}/report.json", vars(report))
    store.mark_done(prefix)
    return examples, report


def provenance_of(spec: PromptSpec, cfg: GenPIConfig) -> dict[str, Any]:
    """What an adapter was made from: enough to find and reproduce it."""
    return {
        "prompt_name": spec.name,
        "prompt_hash": spec.prompt_hash,
        "prompt_id": spec.id,
        "base_model": cfg.models.target.name,
        "generator_model": cfg.models.generator.name,
        "synth_hash": artifacts.synth_hash(cfg),
        "run_hash": artifacts.run_hash(cfg),
        "pg_lambda": cfg.train.pg_lambda,
        "method": cfg.train.method,
        "train": artifacts.train_key(cfg)["train"],
    }
