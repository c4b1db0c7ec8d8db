"""A batch of prompts as a graph: one chain per prompt (synthesis → training → selection →
evaluation), each stage started as soon as the prompt's stage before it has finished.

Ray bounds the work by the cluster's resources: training runs and evaluation tasks queue for
their CPUs/GPUs, syntheses for the shared engine pools (``synth.prompts_in_flight`` at a time),
so one prompt's synthesis overlaps another's training where the cluster has room. The engine pools
start with the first synthesis and are shut down after the last. One "already done?" check, here,
for every unit of every stage (its store prefix); a unit in progress holds a lease against other
jobs on the store. A prompt that fails is recorded with its error and holds no other; the batch
manifest is rewritten as stages finish (``genpi status``), with a progress line for each.

``order="barriers"`` runs the same stages stage-major (every prompt's synthesis, then every
training, ...), as the batch did before the graph: ``bench/batch.py`` measures one against the other.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from typing import Any

from genpi import artifacts, registry, telemetry
from genpi.batch import manifest
from genpi.batch.manifest import Progress, PromptResult
from genpi.batch.stages import (
    Batch,
    Chain,
    Evaluation,
    Outcome,
    Selection,
    Stage,
    Synthesis,
    Training,
    Unit,
    unwrap,
)
from genpi.batch.timeline import Timeline
from genpi.config import GenPIConfig, config_from_dict
from genpi.engines.environments import resolve_backends
from genpi.errors import GenPIError, PromptError
from genpi.prompt.spec import PromptSpec, check_prompt_lengths
from genpi.store import ArtifactStore
from genpi.store.lease import Leases

log = logging.getLogger(__name__)

ORDERS = ("graph", "barriers")
FORCE_STAGES = ("synth", "train", "eval")  # what --force names, in chain order


@dataclass
class _Running:
    """A stage of one chain with units in flight."""

    stage: Stage
    units: list[Unit]
    outcomes: list[Outcome | None]  # by unit, in the stage's order
    started: float
    ran: bool  # some unit was run (not only found)


class Graph:
    """The chains of a batch through ``stages``; :meth:`run` returns when every chain has finished or failed."""

    def __init__(
        self,
        chains: list[Chain],
        stages: list[Stage],
        store: ArtifactStore,
        leases: Leases,
        progress: Progress | None = None,
        order: str = "graph",
        timeline: Timeline | None = None,
    ) -> None:
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, not {order!r}")
        self.chains, self.stages, self.store, self.leases = chains, stages, store, leases
        self.progress, self.order, self.timeline = progress, order, timeline or Timeline()
        self.pending: dict[Future, tuple[Chain, int, float]] = {}  # future -> chain, unit index, start
        self.running: dict[str, _Running] = {}
        self.closed: set[int] = set()  # stages no chain will run again
        self.started = time.time()
        self.stages_done = self.stages_ran = 0

    def run(self) -> None:
        try:
            while True:
                self._close_passed_stages()
                while any([self._launch(c) for c in self.chains if self._ready(c)]):
                    pass
                if not self.pending:
                    break
                waited = time.monotonic()
                done, _ = wait(list(self.pending), timeout=self._time_left(), return_when=FIRST_COMPLETED)
                self.timeline.wait(time.monotonic() - waited)
                for future in done:
                    self._landed(future)
                self._expire()
        finally:
            for k in range(len(self.stages)):
                self._close(k)
            self.timeline.end()

    def _ready(self, chain: Chain) -> bool:
        if _failed(chain) or chain.name in self.running or chain.finished == len(self.stages):
            return False
        if self.order == "barriers":  # every other prompt must have finished the stages before this one
            return all(_failed(c) or c.finished >= chain.finished for c in self.chains)
        return True

    def _launch(self, chain: Chain) -> bool:
        stage = self.stages[chain.finished]
        units = stage.units(chain)
        if units and self.progress is not None:
            self.progress.begin(chain.name, stage.name)
        running = self.running[chain.name] = _Running(stage, units, [None] * len(units), time.time(), False)
        for k, unit in enumerate(units):
            if self.store.is_done(unit.prefix):  # the one "already done?" check
                log.info("[%s] %s found at %s", chain.name, unit.label, self.store.location(unit.shown))
                running.outcomes[k] = (unit, _attempt(stage.found, chain, unit))
                continue
            try:
                self.leases.take(unit.prefix, unit.what)
                future = stage.start(chain, unit)
            except Exception as e:  # a lease another job holds, a task Ray refused: this prompt's failure
                self.leases.release(unit.prefix)
                running.outcomes[k] = (unit, e)
                continue
            running.ran = True
            self.pending[future] = (chain, k, time.monotonic())
        if all(o is not None for o in running.outcomes):
            self._finish(chain)
        return True

    def _landed(self, future: Future) -> None:
        chain, k, started = self.pending.pop(future)
        self.timeline.unit(self.running[chain.name].stage.name, started)
        error = future.exception()
        self._settle(future, chain, k, future.result() if error is None else error)

    def _settle(self, future: Future, chain: Chain, k: int, value: Any) -> None:
        """Unit ``k`` of ``chain``'s running stage ended with ``value`` (its result or error)."""
        running = self.running[chain.name]
        running.stage.forget(future)
        unit = running.units[k]
        self.leases.release(unit.prefix)
        running.outcomes[k] = (unit, value)
        if all(o is not None for o in running.outcomes):
            self._finish(chain)

    def _time_left(self) -> float | None:
        """Seconds until the first unit in flight runs out of time (None: no unit has a limit)."""
        ends = [
            started + stage.timeout_s
            for chain, _, started in self.pending.values()
            if (stage := self.running[chain.name].stage).timeout_s
        ]
        return max(0.0, min(ends) - time.monotonic()) if ends else None

    def _expire(self) -> None:
        """Units past their stage's time are cancelled and fail their prompt (like a failed unit)."""
        now = time.monotonic()
        for future, (chain, k, started) in list(self.pending.items()):
            running = self.running[chain.name]
            limit = running.stage.timeout_s
            if not limit or now - started < limit or future.done():
                continue
            del self.pending[future]
            running.stage.cancel(future)
            error = GenPIError(
                f"{running.units[k].what} did not finish within {limit:g} s ({running.stage.timeout_flag}); "
                "it was cancelled"
            )
            log.error("[%s] %s", chain.name, error)
            self._settle(future, chain, k, error)

    def _finish(self, chain: Chain) -> None:
        running = self.running.pop(chain.name)
        stage = running.stage
        try:
            stage.finish(chain, running.outcomes)
        except Exception as e:
            fail(chain.result, stage.name, e)
            if self.progress is not None:
                self.progress.update()
        else:
            chain.finished += 1
            if running.ran:
                self.stages_ran += 1
                stage_done(self.progress, chain.name, stage.name, time.time() - running.started)
            elif self.progress is not None and chain.finished == len(self.stages):
                self.progress.update()
        self.stages_done += 1
        self._log_progress()

    def _close_passed_stages(self) -> None:
        for k in range(len(self.stages)):
            if all(_failed(c) or c.finished > k for c in self.chains):
                self._close(k)

    def _close(self, k: int) -> None:
        if k not in self.closed:
            self.closed.add(k)
            self.stages[k].close()

    def _log_progress(self) -> None:
        """Prompts through and failed, stages done, the rate of stages run and the time left at that rate."""
        through = sum(c.finished == len(self.stages) for c in self.chains)
        failed = sum(_failed(c) for c in self.chains)
        left = sum(len(self.stages) - c.finished for c in self.chains if not _failed(c))
        minutes = (time.time() - self.started) / 60
        rate = self.stages_ran / minutes if minutes > 0 else 0.0
        eta = f", about {left / rate:.1f} min left" if rate and left else ""
        pace = f" ({rate:.1f} stages/min{eta})" if self.stages_ran else ""  # none run: all found so far
        log.info(
            "progress: %d of %d prompts through, %d failed; %d stages done, %d to go%s",
            through,
            len(self.chains),
            failed,
            self.stages_done,
            left,
            pace,
        )


def _failed(chain: Chain) -> bool:
    return chain.result.status == "failed"


def _attempt(read: Callable[[Chain, Unit], Any], chain: Chain, unit: Unit) -> Any:
    try:
        return read(chain, unit)
    except Exception as e:
        return e


def stage_done(progress: Progress | None, prompt: str, stage: str, seconds: float) -> None:
    telemetry.stage_done(prompt, stage, seconds)
    if progress is not None:
        progress.finished(prompt, stage, seconds)


def fail(result: PromptResult, stage: str, error: BaseException) -> None:
    """Record ``result``'s prompt as failed in ``stage``: a GenPIError by its message, anything else with its type."""
    error = unwrap(error)
    result.status, result.stage = "failed", stage
    result.error = str(error) if isinstance(error, GenPIError) else f"{type(error).__name__}: {error}"
    log.error("[%s] %s failed: %s", result.name, stage, result.error)
    if not isinstance(error, GenPIError):
        log.debug("".join(traceback.format_exception(error)))


def too_long(specs: list[PromptSpec], cfg: GenPIConfig) -> dict[str, PromptError]:
    """The prompts that leave no room in the target's context, each with its error (found before any work)."""
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

    errors = {}
    for spec in specs:
        try:
            check_prompt_lengths([spec], count, context - room, target.name)
        except PromptError as e:
            errors[spec.name] = e
    return errors


def stage_prefixes(spec: PromptSpec, cfg: GenPIConfig, real_inputs: list[str]) -> dict[str, list[str]]:
    """Where each ``--force`` stage keeps one prompt's results under ``cfg`` (every run of its sweep)."""
    runs = cfg.train_runs()
    evals = [
        p
        for run in runs
        for p in (artifacts.validation_prefix(spec, run), artifacts.eval_prefix(spec, run, real_inputs))
    ]
    return {
        "synth": [artifacts.synth_prefix(spec, cfg)],
        "train": [artifacts.train_prefix(spec, run) for run in runs],
        "eval": [artifacts.reference_prefix(spec, cfg, real_inputs), *evals]
        + ([artifacts.selection_prefix(spec, runs)] if len(runs) > 1 else []),
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
    first = min(FORCE_STAGES.index(stage) for stage in force)
    for spec in specs:
        prefixes = stage_prefixes(spec, cfg, real_inputs.get(spec.name, []))
        for stage in FORCE_STAGES[first:]:
            for prefix in prefixes[stage]:
                leases.take(prefix, f"{stage} of {spec.name}")
                store.delete_prefix(prefix)
                leases.release(prefix)
        log.info("[%s] --force: %s redone", spec.name, ", ".join(FORCE_STAGES[first:]))


def synthesize_all(
    specs: list[PromptSpec], cfg: GenPIConfig, store: ArtifactStore, real_inputs: dict[str, list[str]] | None = None
) -> dict[str, Exception]:
    """Synthesize (or find) every prompt's records and references (with its ``real_inputs``) on
    one set of engine pools; returns the failures."""
    real = real_inputs or {}
    chains = [Chain(s, PromptResult(s.name, s.prompt_hash), real.get(s.name, [])) for s in specs]
    with Leases(store) as leases:
        batch = Batch(cfg, store, runs=[])  # synthesis only
        Graph(chains, [Synthesis(batch)], store, leases).run()
    return {c.name: GenPIError(c.result.error) for c in chains if _failed(c)}


def run_batch(
    specs: list[PromptSpec],
    cfg: GenPIConfig,
    store: ArtifactStore,
    real_inputs: dict[str, list[str]] | None = None,
    force: list[str] | None = None,
    order: str = "graph",
    timeline: Timeline | None = None,
    unreadable: dict[str, str] | None = None,
) -> list[PromptResult]:
    """Run every prompt through synthesis, training, selection and evaluation; one result per prompt.

    ``real_inputs`` maps prompt names to real inputs evaluated beside the synthesized test split;
    ``force`` names stages to redo (with the stages after them) instead of reusing what is stored;
    ``order`` is ``graph`` or ``barriers``; ``timeline``, when given, records the stages' busy times;
    ``unreadable`` (``{file: error}``) are prompt files that did not load, recorded as failed in ``load``.
    """
    real_inputs = real_inputs or {}
    cfg = resolve_backends(cfg)
    started = time.time()
    chains = [Chain(s, PromptResult(s.name, s.prompt_hash), real_inputs.get(s.name, [])) for s in specs]
    unloaded = [PromptResult(f, "", "failed", "load", error) for f, error in (unreadable or {}).items()]
    results = [c.result for c in chains] + unloaded
    progress = Progress(store, artifacts.batch_prefix(specs, cfg, real_inputs), cfg, {r.name: r for r in results})
    overlong = too_long(specs, cfg)
    for name, error in overlong.items():
        fail(next(c.result for c in chains if c.name == name), Synthesis.name, error)
    progress.update()
    # Workers get the store as resolved here: a relative folder means this process's folder.
    worker_store = {**cfg.to_dict()["store"], "url": store.url}
    batch = Batch(cfg, store, [config_from_dict(r.to_dict() | {"store": worker_store}) for r in cfg.train_runs()])
    for section in ("train", "eval"):  # before any work: GPUs the cluster lacks would fail only after synthesis
        batch.resources(section)
    for spec in specs:  # a server answers these in prompt mode until their adapters pass
        if spec.name not in overlong:
            registry.record_prompt(store, spec)
    with Leases(store) as leases:  # each stage in progress held against other jobs on this store
        if force:
            force_stages(specs, cfg, store, real_inputs, force, leases)
        stages = [Synthesis(batch), Training(batch), Selection(batch), Evaluation(batch)]
        Graph(chains, stages, store, leases, progress, order, timeline).run()
    for result in results:
        telemetry.prompt_ended(
            "failed" if result.status == "failed" else "published" if result.passed else "gate_failed"
        )
    reports = [c.report for c in chains if c.report is not None]
    manifest.write_batch(specs, cfg, store, results, reports, real_inputs, time.time() - started, progress.started_at)
    return results
