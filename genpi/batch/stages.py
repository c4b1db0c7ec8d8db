"""A prompt's stages behind one small interface, for the batch graph (:mod:`genpi.batch.graph`).

A stage splits its work for one prompt into units (synthesis: one; training: one per run of the
sweep; selection: one when several runs finished, else none; evaluation: one). A unit's output
lives under its store prefix, which is also its "already done?" key: the graph checks it, runs
the units that are not done (each as a future, holding the stage's resources) and hands every
unit's outcome to :meth:`Stage.finish`, which passes the prompt on to the next stage or fails it.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import ray

from genpi import artifacts, registry, telemetry
from genpi.batch import tasks
from genpi.batch.manifest import PromptResult
from genpi.batch.resources import SharedEngines, task_resources
from genpi.config import PG_METHODS, GenPIConfig
from genpi.errors import GenPIError
from genpi.evaluate.references import make_references
from genpi.prompt.spec import PromptSpec
from genpi.store import ArtifactStore
from genpi.synth.stage import synthesize

log = logging.getLogger(__name__)


@dataclass
class Chain:
    """One prompt's way through the stages, and what each finished stage handed the next."""

    spec: PromptSpec
    result: PromptResult
    real_inputs: list[str]
    finished: int = 0  # stages finished (an index into the graph's stages)
    runs: list[GenPIConfig] = field(default_factory=list)  # finished training runs, in sweep order
    chosen: GenPIConfig | None = None
    selection: dict | None = None
    report: dict | None = None

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class Unit:
    """A piece of one stage's work for one prompt, done when ``prefix`` is marked done in the store."""

    prefix: str
    what: str  # for leases and logs: "training run sft seed 0 of shell-agent"
    label: str  # "<label> found at <shown>"
    shown: str  # the store key a log line points at
    run: GenPIConfig | None = None


Outcome = tuple[Unit, Any]  # a unit and its value, or the exception it ended with


@dataclass
class Batch:
    """What every stage of a batch shares: the config (workers get the store as resolved here), the
    store, the shared engine pools and the CPUs/GPUs each training run and evaluation task holds."""

    cfg: GenPIConfig
    store: ArtifactStore
    runs: list[GenPIConfig]  # the sweep's runs, as workers get them
    engines: SharedEngines = field(init=False)
    synthesizing: ThreadPoolExecutor = field(init=False)

    def __post_init__(self) -> None:
        self.engines = SharedEngines(self.cfg)
        # A few prompts at a time, so that while one prompt's role play holds the target, another's
        # inputs or reasons keep the generator busy. Each call is self-contained: same records.
        self.synthesizing = ThreadPoolExecutor(self.cfg.synth.prompts_in_flight, thread_name_prefix="synth")

    def resources(self, section: str) -> tuple[float, float]:
        """The CPUs and GPUs a ``train`` or ``eval`` task asks for, sized by the cluster as it is
        when the task starts (a node that joined since is counted)."""
        part = getattr(self.cfg, section)
        return task_resources(section, part.num_cpus, part.num_gpus)


class Stage(ABC):
    """One stage of every prompt's chain."""

    name: str  # as the manifest names it: synthesis, training, selection, evaluation
    force: str  # the --force name that redoes it (with the stages after it)
    timeout_flag = ""  # the config field bounding one unit's time ("": none; engine calls have their own)

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self.tasks: dict[Future, Any] = {}  # a unit's future -> its Ray task, to cancel it

    @property
    def timeout_s(self) -> float:
        """How long one unit may run (0: no limit)."""
        if not self.timeout_flag:
            return 0.0
        section, field = self.timeout_flag.split(".")
        return float(getattr(getattr(self.batch.cfg, section), field))

    def _task(self, ref: Any) -> Future:
        future = ref.future()
        self.tasks[future] = ref
        return future

    def cancel(self, future: Future) -> None:
        """Stop a unit that ran past its time: its Ray task is cancelled (force: a hung task does not listen)."""
        ref = self.tasks.get(future)
        if ref is not None:
            ray.cancel(ref, force=True)

    def forget(self, future: Future) -> None:
        """A unit ended: let go of its task (a held reference keeps its result in Ray's object store)."""
        self.tasks.pop(future, None)

    @abstractmethod
    def units(self, chain: Chain) -> list[Unit]:
        """The stage's work for ``chain`` (its inputs exist: the stages before it have finished)."""

    @abstractmethod
    def start(self, chain: Chain, unit: Unit) -> Future:
        """Run one unit that is not done yet; the future holds its value."""

    def found(self, chain: Chain, unit: Unit) -> Any:
        """The value of a unit that is already done, read from the store."""
        return None

    @abstractmethod
    def finish(self, chain: Chain, outcomes: list[Outcome]) -> None:
        """Pass what the units gave on to ``chain`` for the next stage; raise to fail the prompt."""

    def close(self) -> None:
        """No chain will run this stage again: let go of what it holds (most hold nothing between units)."""
        return None


def _raise_first(outcomes: list[Outcome]) -> None:
    for _, value in outcomes:
        if isinstance(value, BaseException):
            raise value


class Synthesis(Stage):
    """The prompt's records, then its held-out references (the teacher's and the base's episodes
    and the teacher's samples on the evaluation inputs), both on the shared engine pools: the
    references need no adapter, and the pools are up now. Done when the references are."""

    name, force = "synthesis", "synth"

    def units(self, chain: Chain) -> list[Unit]:
        cfg = self.batch.cfg
        done = artifacts.reference_prefix(chain.spec, cfg, chain.real_inputs)
        shown = artifacts.synth_prefix(chain.spec, cfg)
        return [Unit(done, f"synthesis of {chain.name}", "synthesis", shown)]

    def start(self, chain: Chain, unit: Unit) -> Future:
        return self.batch.synthesizing.submit(self._synthesize, chain.spec, chain.real_inputs)

    def _synthesize(self, spec: PromptSpec, real_inputs: list[str]) -> str:
        with self.batch.engines.pools() as (generator, target):
            records = synthesize(spec, self.batch.cfg, generator, target, self.batch.store)
            make_references(spec, self.batch.cfg, self.batch.store, target, real_inputs)
            return records

    def finish(self, chain: Chain, outcomes: list[Outcome]) -> None:
        _raise_first(outcomes)

    def close(self) -> None:
        self.batch.synthesizing.shutdown(wait=False, cancel_futures=True)
        self.batch.engines.close()


class Training(Stage):
    """One Ray Train run per run of the sweep; a failing run stops no other, and the prompt goes on
    with the runs that finished."""

    name, force, timeout_flag = "training", "train", "train.timeout_s"

    def units(self, chain: Chain) -> list[Unit]:
        units = []
        for run in self.batch.runs:
            prefix, t = artifacts.train_prefix(chain.spec, run), run.train
            what = f"training run {t.method} seed {t.seed} of {chain.name}"
            units.append(Unit(prefix, what, "adapter", f"{prefix}/adapter", run))
        return units

    def start(self, chain: Chain, unit: Unit) -> Future:
        cpus, gpus = self.batch.resources("train")
        return self._task(tasks.train_run.remote(chain.spec.to_json(), unit.run.to_dict(), cpus, gpus))

    def finish(self, chain: Chain, outcomes: list[Outcome]) -> None:
        errors = []
        for unit, value in outcomes:
            if not isinstance(value, BaseException):
                chain.runs.append(unit.run)
                continue
            t = unit.run.train
            log.error(
                "[%s] training run %s (lambda %.2f, seed %d) failed: %s",
                chain.name,
                t.method,
                t.pg_lambda,
                t.seed,
                unwrap(value),
            )
            errors.append(value)
        if not chain.runs:
            raise errors[0] if errors else GenPIError("no run finished")


class Selection(Stage):
    """A sweep's run chosen on the validation split; nothing to do when one run finished."""

    name, force, timeout_flag = "selection", "eval", "eval.timeout_s"

    def units(self, chain: Chain) -> list[Unit]:
        if len(chain.runs) < 2:
            return []
        prefix = artifacts.selection_prefix(chain.spec, chain.runs)
        return [Unit(prefix, f"selection of {chain.name}", "selection", f"{prefix}/selection.json")]

    def start(self, chain: Chain, unit: Unit) -> Future:
        cpus, gpus = self.batch.resources("eval")
        task = tasks.select_task.options(num_cpus=cpus, num_gpus=gpus)
        return self._task(task.remote(chain.spec.to_json(), [r.to_dict() for r in chain.runs]))

    def found(self, chain: Chain, unit: Unit) -> Any:
        return self.batch.store.get_json(unit.shown)

    def finish(self, chain: Chain, outcomes: list[Outcome]) -> None:
        _raise_first(outcomes)
        chain.chosen = chain.runs[0]
        for _, selection in outcomes:
            chain.selection, chain.chosen = selection, chain.runs[selection["chosen"]]


class Evaluation(Stage):
    """The chosen run on the test split (and real inputs): gated, published when it passes."""

    name, force, timeout_flag = "evaluation", "eval", "eval.timeout_s"

    def units(self, chain: Chain) -> list[Unit]:
        prefix = artifacts.eval_prefix(chain.spec, chain.chosen, chain.real_inputs)
        return [Unit(prefix, f"evaluation of {chain.name}", "evaluation", prefix, chain.chosen)]

    def start(self, chain: Chain, unit: Unit) -> Future:
        cpus, gpus = self.batch.resources("eval")
        task = tasks.evaluate_task.options(num_cpus=cpus, num_gpus=gpus)
        return self._task(task.remote(chain.spec.to_json(), unit.run.to_dict(), chain.real_inputs))

    def found(self, chain: Chain, unit: Unit) -> Any:
        return self.batch.store.get_json(f"{unit.prefix}/report.json")

    def finish(self, chain: Chain, outcomes: list[Outcome]) -> None:
        _raise_first(outcomes)
        ((_, report),) = outcomes
        telemetry.gate_figures(chain.name, {f"{c['metric']}_{c['kind']}": c["value"] for c in report["gate"]["checks"]})
        store = self.batch.store
        # Where the report and the adapter are in this store as it is reached now: a report found
        # in a store that was moved or copied holds the places it was written at.
        version = registry.version_prefix(chain.name, artifacts.published_version(chain.spec, chain.chosen))
        report = {
            **report,
            "location": store.location(
                f"{artifacts.eval_prefix(chain.spec, chain.chosen, chain.real_inputs)}/report.md"
            ),
            "published": store.location(version) if report["published"] else None,
        }
        if chain.selection:
            report = {**report, "selection": chain.selection}
        chain.report = report
        result, synth = chain.result, artifacts.synth_prefix(chain.spec, self.batch.cfg)
        t = chain.chosen.train
        result.status, result.stage = "done", "evaluated"
        result.run = (
            f"{t.method}"
            + (f" lambda {t.pg_lambda:g}" if t.method in PG_METHODS else "")
            + f" seed {t.seed}"
            + (f" (best of {len(chain.selection['runs'])} on validation)" if chain.selection else "")
        )
        result.passed, result.gate, result.published = (
            report["gate"]["passed"],
            report["gate"]["summary"],
            report["published"],
        )
        result.artifacts = {
            "adapter": store.location(f"{artifacts.train_prefix(chain.spec, chain.chosen)}/adapter"),
            "report": report["location"],
            "records": store.location(f"{synth}/records.jsonl"),
            "quality": store.location(f"{synth}/quality.json"),
        }


def unwrap(error: BaseException) -> BaseException:
    """A Ray task's error as the exception its task raised (a GenPIError as itself: its one line,
    without the remote traceback)."""
    if isinstance(error, ray.exceptions.RayTaskError):
        return error.cause if isinstance(error.cause, GenPIError) else error.as_instanceof_cause()
    return error
