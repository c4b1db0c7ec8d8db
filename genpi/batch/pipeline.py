"""A batch of prompts through the stages, on Ray: synthesize → train → evaluate → manifest.

Stage-major: the engine actors (generator and target) are started once and serve every
prompt's synthesis; then they are released and one Ray Train run per (prompt, method, λ, seed)
of the sweep is submitted (all at once; Ray schedules their workers as resources free up); with
several runs, one selection task per prompt chooses a run on the validation split; then one
evaluation task per prompt (which gates and
publishes the adapter). A prompt that fails is reported and the others go on; everything
finished is in the store, so a rerun resumes where the last one stopped.
"""

from __future__ import annotations

import logging
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray

from genpi import artifacts, telemetry
from genpi.batch import manifest, tasks
from genpi.batch.manifest import Progress, PromptResult
from genpi.batch.tasks import task_resources
from genpi.config import PG_METHODS, GenPIConfig, config_from_dict
from genpi.engines.environments import resolve_backends
from genpi.errors import EngineError, GenPIError
from genpi.prompt.spec import PromptSpec, check_prompt_lengths
from genpi.store import ArtifactStore
from genpi.store.lease import LeaseHeld, Leases
from genpi.synth.stage import synthesize

log = logging.getLogger(__name__)


def _timed(progress: Progress | None, prompt: str, stage: str, work: Any, *args: Any) -> Any:
    """``work(*args)``, its wall time recorded as ``prompt``'s ``stage`` (a failed stage records none)."""
    started = time.time()
    out = work(*args)
    _stage_done(progress, prompt, stage, time.time() - started)
    return out


def _stage_done(progress: Progress | None, prompt: str, stage: str, seconds: float) -> None:
    telemetry.stage_done(prompt, stage, seconds)
    if progress is not None:
        progress.finished(prompt, stage, seconds)


def _fail(result: PromptResult, stage: str, error: BaseException) -> None:
    result.status, result.stage = "failed", stage
    if isinstance(error, ray.exceptions.RayTaskError):  # a message for the user stays one line, no remote traceback
        error = error.cause if isinstance(error.cause, GenPIError) else error.as_instanceof_cause()
    result.error = str(error) if isinstance(error, GenPIError) else f"{type(error).__name__}: {error}"
    log.error("[%s] %s failed: %s", result.name, stage, result.error)
    if not isinstance(error, GenPIError):
        log.debug("".join(traceback.format_exception(error)))


def check_lengths(specs: list[PromptSpec], cfg: GenPIConfig) -> None:
    """Fail fast, before any work, when a prompt leaves no room in the target's context."""
    from transformers import AutoTokenizer

    from genpi.chat import chat_ids, context_length
    from genpi.models import resolve_model

    target = cfg.models.target
    folder = resolve_model(target.name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    context = context_length(folder)
    context = min(context, target.max_context) if target.max_context else context
    room = max(cfg.synth.agent_max_tokens, cfg.synth.output_max_tokens)

    def count(messages: list[dict]) -> int:
        return len(chat_ids(tokenizer, messages, generation_prompt=True))

    check_prompt_lengths(specs, count, context - room, target.name)


def synthesize_all(
    specs: list[PromptSpec],
    cfg: GenPIConfig,
    store: ArtifactStore,
    leases: Leases | None = None,
    progress: Progress | None = None,
) -> dict[str, Exception]:
    """Synthesize (or find) every prompt's records on one set of engine actors; returns the failures.

    Each prompt's synthesis holds a lease (of ``leases``, else of its own) while it runs."""
    if leases is None:
        with Leases(store) as leases:
            return synthesize_all(specs, cfg, store, leases, progress)
    failures: dict[str, Exception] = {}
    todo = []
    for spec in specs:
        prefix = artifacts.synth_prefix(spec, cfg)
        if store.is_done(prefix):
            log.info("[%s] synthesis found at %s", spec.name, store.location(prefix))
            continue
        try:
            leases.take(prefix, f"synthesis of {spec.name}")
        except LeaseHeld as e:
            failures[spec.name] = e
            continue
        todo.append(spec)
    if not todo:
        return failures
    from genpi.engines.actors import start_pools

    def stop(pools: tuple[Any, Any]) -> None:
        for pool in {id(p): p for p in pools}.values():
            pool.shutdown()

    log.info("starting engines: generator %s, target %s", cfg.models.generator.name, cfg.models.target.name)
    pools = start_pools(cfg.models.generator, cfg.models.target)
    width = cfg.synth.prompts_in_flight
    try:
        # A few prompts at a time, so that while one prompt's role play holds the target, another's
        # inputs or reasons keep the generator busy. Each call is self-contained: same records.
        for start in range(0, len(todo), width):
            wave = todo[start : start + width]
            with ThreadPoolExecutor(max_workers=len(wave), thread_name_prefix="synth") as prompts:
                running = {
                    spec.name: prompts.submit(
                        _timed, progress, spec.name, "synthesis", synthesize, spec, cfg, *pools, store
                    )
                    for spec in wave
                }
            for spec in wave:
                leases.release(artifacts.synth_prefix(spec, cfg))
            wave_failures = {name: f.exception() for name, f in running.items() if f.exception() is not None}
            failures.update(wave_failures)  # one prompt's failure must not stop the batch
            if any(isinstance(e, EngineError) for e in wave_failures.values()) and start + width < len(todo):
                stop(pools)  # out of restarts: fresh engines for the prompts left
                log.info("starting new engines for the prompts left")
                pools = start_pools(cfg.models.generator, cfg.models.target)
    finally:
        stop(pools)
    return failures


def train_all(
    specs: list[PromptSpec],
    runs: list[GenPIConfig],
    store: ArtifactStore,
    cpus: float,
    gpus: float,
    leases: Leases | None = None,
    progress: Progress | None = None,
) -> tuple[dict[str, list[GenPIConfig]], dict[str, Exception]]:
    """Every (prompt, run) as a Ray Train run, all submitted at once; a failing run stops no other.

    Returns each prompt's finished runs (in sweep order) and each prompt's first failure. Each run
    holds a lease (of ``leases``, else of its own) while it runs.
    """
    if leases is None:
        with Leases(store) as leases:
            return train_all(specs, runs, store, cpus, gpus, leases, progress)
    refs = {}
    started = time.time()
    held: dict[tuple[str, int], Exception] = {}
    for spec in specs:
        for k, run in enumerate(runs):
            prefix = artifacts.train_prefix(spec, run)
            if store.is_done(prefix):
                log.info("[%s] adapter found at %s", spec.name, store.location(f"{prefix}/adapter"))
                continue
            try:
                leases.take(prefix, f"training run {run.train.method} seed {run.train.seed} of {spec.name}")
            except LeaseHeld as e:
                held[(spec.name, k)] = e
                continue
            refs[(spec.name, k)] = tasks.train_run.remote(spec.to_json(), run.to_dict(), cpus, gpus)
    finished: dict[str, list[GenPIConfig]] = {}
    errors: dict[str, Exception] = {}
    for spec in specs:
        mine = [ref for (name, _), ref in refs.items() if name == spec.name]
        if mine:  # the prompt's training: from the runs' submission until its last run ends
            ray.wait(mine, num_returns=len(mine))
            _stage_done(progress, spec.name, "training", time.time() - started)
        for k, run in enumerate(runs):
            try:
                if (spec.name, k) in held:
                    raise held[(spec.name, k)]
                if (spec.name, k) in refs:
                    try:
                        ray.get(refs[(spec.name, k)])
                    finally:
                        leases.release(artifacts.train_prefix(spec, run))
                finished.setdefault(spec.name, []).append(run)
            except Exception as e:  # reported; the prompt's other runs go on
                if isinstance(e, ray.exceptions.RayTaskError):
                    e = e.as_instanceof_cause()
                log.error(
                    "[%s] training run %s (lambda %.2f, seed %d) failed: %s",
                    spec.name,
                    run.train.method,
                    run.train.pg_lambda,
                    run.train.seed,
                    e,
                )
                errors.setdefault(spec.name, e)
    return finished, errors


STAGES = ("synth", "train", "eval")


def stage_prefixes(spec: PromptSpec, cfg: GenPIConfig, real_inputs: list[str]) -> dict[str, list[str]]:
    """Where each stage keeps one prompt's results under ``cfg`` (every run of its sweep)."""
    runs = cfg.train_runs()
    evals = [
        p
        for run in runs
        for p in (artifacts.validation_prefix(spec, run), artifacts.eval_prefix(spec, run, real_inputs))
    ]
    return {
        "synth": [artifacts.synth_prefix(spec, cfg)],
        "train": [artifacts.train_prefix(spec, run) for run in runs],
        "eval": evals + ([artifacts.selection_prefix(spec, runs)] if len(runs) > 1 else []),
    }


def force_stages(
    specs: list[PromptSpec],
    cfg: GenPIConfig,
    store: ArtifactStore,
    real_inputs: dict[str, list[str]],
    force: list[str],
    leases: Leases,
) -> None:
    """``--force STAGE``: delete what that stage and the ones after it stored for these prompts, so
    this run redoes them (a stage another job is running is refused, naming the job)."""
    first = min(STAGES.index(stage) for stage in force)
    for spec in specs:
        prefixes = stage_prefixes(spec, cfg, real_inputs.get(spec.name, []))
        for stage in STAGES[first:]:
            for prefix in prefixes[stage]:
                leases.take(prefix, f"{stage} of {spec.name}")
                store.delete_prefix(prefix)
                leases.release(prefix)
        log.info("[%s] --force: %s redone", spec.name, ", ".join(STAGES[first:]))


def run_batch(
    specs: list[PromptSpec],
    cfg: GenPIConfig,
    store: ArtifactStore,
    real_inputs: dict[str, list[str]] | None = None,
    force: list[str] | None = None,
) -> list[PromptResult]:
    """Run every prompt through synthesis, training and evaluation; returns one result per prompt.

    ``real_inputs`` maps prompt names to real inputs evaluated beside the synthesized test split;
    ``force`` names stages to redo (with the stages after them) instead of reusing what is stored.
    """
    real_inputs = real_inputs or {}
    cfg = resolve_backends(cfg)
    started = time.time()
    results = {s.name: PromptResult(s.name, s.prompt_hash) for s in specs}
    progress = Progress(store, artifacts.batch_prefix(specs, cfg, real_inputs), cfg, results)
    check_lengths(specs, cfg)
    # Before any work: a stage asking for GPUs the cluster lacks would fail only after synthesis.
    cpus, gpus = task_resources("train", cfg.train.num_cpus, cfg.train.num_gpus)
    eval_cpus, eval_gpus = task_resources("eval", cfg.eval.num_cpus, cfg.eval.num_gpus)

    with Leases(store) as leases:  # each stage in progress held against other jobs on this store
        if force:
            force_stages(specs, cfg, store, real_inputs, force, leases)
        for spec in specs:
            progress.begin(spec.name, "synthesis")
        for name, error in synthesize_all(specs, cfg, store, leases, progress).items():
            _fail(results[name], "synthesis", error)
        for spec in specs:
            progress.begin(spec.name, "training")

        # Workers get the store as resolved here: a relative folder means this process's folder.
        worker_cfg = cfg.to_dict()
        worker_cfg["store"]["url"] = store.url
        runs = [config_from_dict(r.to_dict() | {"store": worker_cfg["store"]}) for r in cfg.train_runs()]
        trained, errors = train_all(
            [s for s in specs if results[s.name].status != "failed"], runs, store, cpus, gpus, leases, progress
        )
        chosen: dict[str, GenPIConfig] = {}
        selections: dict[str, dict] = {}
        for spec in specs:
            if results[spec.name].status == "failed":
                continue
            if spec.name not in trained:
                _fail(results[spec.name], "training", errors.get(spec.name) or GenPIError("no run finished"))
                continue
            chosen[spec.name] = trained[spec.name][0]
            progress.begin(spec.name, "selection" if len(trained[spec.name]) > 1 else "evaluation")
        by_name = {s.name: s for s in specs}
        select_refs = {
            name: tasks.select_task.options(num_cpus=eval_cpus, num_gpus=eval_gpus).remote(
                by_name[name].to_json(), [r.to_dict() for r in trained[name]]
            )
            for name in chosen
            if len(trained[name]) > 1
        }
        for name, ref in select_refs.items():
            try:
                selections[name] = ray.get(ref)
                chosen[name] = trained[name][selections[name]["chosen"]]
            except Exception as e:
                _fail(results[name], "selection", e)
                chosen.pop(name)
                continue
            progress.begin(name, "evaluation")

        evaluating = time.time()
        eval_refs = {}
        for name, run in chosen.items():
            try:
                leases.take(
                    artifacts.eval_prefix(by_name[name], run, real_inputs.get(name, [])), f"evaluation of {name}"
                )
            except LeaseHeld as e:
                _fail(results[name], "evaluation", e)
                continue
            eval_refs[name] = tasks.evaluate_task.options(num_cpus=eval_cpus, num_gpus=eval_gpus).remote(
                by_name[name].to_json(), run.to_dict(), real_inputs.get(name, [])
            )
        reports = []
        for spec in specs:
            result = results[spec.name]
            if spec.name not in eval_refs:
                continue
            try:
                report = ray.get(eval_refs[spec.name])
            except Exception as e:
                _fail(result, "evaluation", e)
                continue
            finally:
                leases.release(artifacts.eval_prefix(spec, chosen[spec.name], real_inputs.get(spec.name, [])))
            _stage_done(progress, spec.name, "evaluation", time.time() - evaluating)
            telemetry.gate_figures(
                spec.name, {f"{c['metric']}_{c['kind']}": c["value"] for c in report["gate"]["checks"]}
            )
            if spec.name in selections:
                report = {**report, "selection": selections[spec.name]}
            reports.append(report)
            train = artifacts.train_prefix(spec, chosen[spec.name])
            result.status, result.stage = "done", "evaluated"
            t = chosen[spec.name].train
            result.run = (
                f"{t.method}"
                + (f" lambda {t.pg_lambda:g}" if t.method in PG_METHODS else "")
                + f" seed {t.seed}"
                + (f" (best of {len(selections[spec.name]['runs'])} on validation)" if spec.name in selections else "")
            )
            result.passed, result.gate, result.published = (
                report["gate"]["passed"],
                report["gate"]["summary"],
                report["published"],
            )
            result.artifacts = {
                "adapter": store.location(f"{train}/adapter"),
                "report": report["location"],
                "records": store.location(f"{artifacts.synth_prefix(spec, cfg)}/records.jsonl"),
                "quality": store.location(f"{artifacts.synth_prefix(spec, cfg)}/quality.json"),
            }
            progress.update()
        for result in results.values():
            telemetry.prompt_ended(
                "failed" if result.status == "failed" else "published" if result.passed else "gate_failed"
            )
    manifest.write_batch(
        specs, cfg, store, list(results.values()), reports, real_inputs, time.time() - started, progress.started_at
    )
    return list(results.values())
