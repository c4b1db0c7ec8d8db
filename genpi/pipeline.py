"""A batch of prompts through the stages, on Ray: synthesize → train → manifest.

Stage-major: the engine actors (generator and target) are started once and serve every
prompt's synthesis; then they are released and one training task per prompt is scheduled
by Ray on the resources it asks for. A prompt that fails is reported and the others go on;
everything finished is in the store, so a rerun resumes where the last one stopped.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass, field
from typing import Any

import ray

from genpi import layout
from genpi.config import GenPIConfig, config_from_dict
from genpi.errors import GenPIError
from genpi.prompts import PromptSpec, check_prompt_lengths
from genpi.store import ArtifactStore, open_store
from genpi.synth.stage import synthesize

log = logging.getLogger(__name__)


@dataclass
class PromptResult:
    """Where one prompt got to."""

    name: str
    prompt_hash: str
    status: str = "pending"  # pending | done | failed
    stage: str = ""
    error: str = ""
    artifacts: dict[str, str] = field(default_factory=dict)


def store_for(cfg: GenPIConfig) -> ArtifactStore:
    """The configured artifact store (opened anew in each Ray worker)."""
    return open_store(cfg.store.url, endpoint_url=cfg.store.endpoint_url or None, region=cfg.store.region or None)


@ray.remote
def _train_task(spec_json: dict[str, Any], cfg_dict: dict[str, Any]) -> str:
    from genpi.train.stage import train_prompt

    logging.basicConfig(level=logging.INFO, format="%(asctime)s genpi %(message)s")
    cfg = config_from_dict(cfg_dict)
    return train_prompt(PromptSpec.from_json(spec_json), cfg, store_for(cfg))


def _fail(result: PromptResult, stage: str, error: BaseException) -> None:
    result.status, result.stage = "failed", stage
    if isinstance(error, ray.exceptions.RayTaskError):
        error = error.as_instanceof_cause()
    result.error = str(error) if isinstance(error, GenPIError) else f"{type(error).__name__}: {error}"
    log.error("[%s] %s failed: %s", result.name, stage, result.error)
    if not isinstance(error, GenPIError):
        log.debug("".join(traceback.format_exception(error)))


def check_lengths(specs: list[PromptSpec], cfg: GenPIConfig) -> None:
    """Fail fast, before any work, when a prompt leaves no room in the target's context."""
    from transformers import AutoConfig, AutoTokenizer

    from genpi.engines.models import resolve_model

    target = cfg.models.target
    folder = resolve_model(target.name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    context = int(getattr(AutoConfig.from_pretrained(folder), "max_position_embeddings", 2048))
    context = min(context, target.max_context) if target.max_context else context
    room = max(cfg.synth.agent_max_tokens, cfg.synth.output_max_tokens)

    def count(messages: list[dict]) -> int:
        return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"])

    check_prompt_lengths(specs, count, context - room, target.name)


def run_batch(specs: list[PromptSpec], cfg: GenPIConfig, store: ArtifactStore) -> list[PromptResult]:
    """Run every prompt through synthesis and training; returns one result per prompt."""
    results = {s.name: PromptResult(s.name, s.prompt_hash) for s in specs}
    check_lengths(specs, cfg)

    todo = []
    for spec in specs:
        prefix = layout.synth_prefix(spec, cfg)
        if store.is_done(prefix):
            log.info("[%s] synthesis found at %s", spec.name, store.location(prefix))
        else:
            todo.append(spec)
    if todo:
        from genpi.engines.actors import start_pools

        log.info("starting engines: generator %s, target %s", cfg.models.generator.name, cfg.models.target.name)
        generator, target = start_pools(cfg.models.generator, cfg.models.target)
        try:
            for spec in todo:
                try:
                    synthesize(spec, cfg, generator, target, store)
                except Exception as e:  # one prompt's failure must not stop the batch
                    _fail(results[spec.name], "synthesis", e)
        finally:
            for pool in {id(generator): generator, id(target): target}.values():
                pool.shutdown()

    ready = []
    for spec in specs:
        if results[spec.name].status == "failed":
            continue
        train = layout.train_prefix(spec, cfg)
        if store.is_done(train):
            log.info("[%s] adapter found at %s", spec.name, store.location(f"{train}/adapter"))
        else:
            ready.append(spec)
    # Never ask for more CPUs than the cluster has, or the task would wait forever.
    cpus = min(cfg.train.num_cpus, ray.cluster_resources().get("CPU", 1.0))
    # Workers get the store as resolved here: a relative folder means this process's folder.
    worker_cfg = cfg.to_dict()
    worker_cfg["store"]["url"] = store.url
    refs = {s.name: _train_task.options(num_cpus=cpus, num_gpus=cfg.train.num_gpus)
            .remote(s.to_json(), worker_cfg) for s in ready}
    for name, ref in refs.items():
        try:
            ray.get(ref)
        except Exception as e:
            _fail(results[name], "training", e)

    for spec in specs:
        result = results[spec.name]
        if result.status != "failed":
            result.status, result.stage = "done", "trained"
            train = layout.train_prefix(spec, cfg)
            result.artifacts = {"adapter": store.location(f"{train}/adapter"),
                                "summary": store.location(f"{train}/summary.json"),
                                "records": store.location(f"{layout.synth_prefix(spec, cfg)}/records.jsonl"),
                                "quality": store.location(f"{layout.synth_prefix(spec, cfg)}/quality.json")}
    manifest = f"{layout.batch_prefix(specs, cfg)}/manifest.json"
    store.put_json(manifest, {"config": cfg.to_dict(), "prompts": [vars(r) for r in results.values()]})
    log.info("batch manifest: %s", store.location(manifest))
    return list(results.values())
