"""The stage graph's scheduling on stages that sleep instead of working: overlap, barriers,
failures that hold no other prompt, and the one "already done?" check."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from genpi.batch.graph import Graph
from genpi.batch.manifest import PromptResult
from genpi.batch.stages import Chain, Outcome, Stage, Unit
from genpi.store import ArtifactStore, open_store
from genpi.store.lease import Leases
from tests.fakes import mini_spec


class Sleep(Stage):
    """A stage whose unit sleeps ``seconds[prompt]``, stores a marker and logs (stage, prompt, start, end)."""

    def __init__(
        self, name: str, store: ArtifactStore, seconds: dict[str, float], events: list, fail: str = ""
    ) -> None:
        self.name, self.force = name, name
        self.store, self.seconds, self.events, self.fail = store, seconds, events, fail
        self.pool = ThreadPoolExecutor(8)
        self.closed = 0
        self.tasks: dict = {}  # no Ray tasks (Stage.__init__ is not called)

    def units(self, chain: Chain) -> list[Unit]:
        prefix = f"fake/{self.name}/{chain.name}"
        return [Unit(prefix, f"{self.name} of {chain.name}", self.name, prefix)]

    def start(self, chain: Chain, unit: Unit) -> Future:
        return self.pool.submit(self._work, chain.name, unit.prefix)

    def _work(self, prompt: str, prefix: str) -> str:
        started = time.monotonic()
        time.sleep(self.seconds.get(prompt, 0.05))
        self.events.append((self.name, prompt, started, time.monotonic()))
        if prompt == self.fail:
            raise RuntimeError(f"{self.name} broke on {prompt}")
        self.store.mark_done(prefix)
        return prompt

    def finish(self, chain: Chain, outcomes: list[Outcome]) -> None:
        for _, value in outcomes:
            if isinstance(value, BaseException):
                raise value

    def close(self) -> None:
        self.closed += 1


def _chains(*names: str) -> list[Chain]:
    return [Chain(mini_spec(name=n), PromptResult(n, "h"), []) for n in names]


def _run(store: ArtifactStore, stages: list[Stage], chains: list[Chain], order: str) -> None:
    with Leases(store) as leases:
        Graph(chains, stages, store, leases, order=order).run()


def _span(events: list, stage: str, prompt: str) -> tuple[float, float]:
    ((start, end),) = [(s, e) for st, p, s, e in events if (st, p) == (stage, prompt)]
    return start, end


@pytest.mark.parametrize("order", ["graph", "barriers"])
def test_a_prompt_goes_on_as_soon_as_its_own_stage_is_done_or_at_the_barrier(tmp_path: Path, order: str) -> None:
    store, events = open_store(str(tmp_path)), []
    synth = {"slow": 0.6, "fast": 0.05}
    stages = [Sleep("synthesis", store, synth, events), Sleep("training", store, {}, events)]
    chains = _chains("slow", "fast")
    _run(store, stages, chains, order)

    assert all(c.finished == 2 and c.result.status == "pending" for c in chains)
    fast_trained, slow_synthesized = _span(events, "training", "fast")[0], _span(events, "synthesis", "slow")[1]
    if order == "graph":  # the fast prompt trains while the slow one still synthesizes
        assert fast_trained < slow_synthesized
    else:
        assert fast_trained >= slow_synthesized
    assert [s.closed for s in stages] == [1, 1]
    assert not [k for k in store.list_keys() if k.endswith(".lease")]


@pytest.mark.parametrize("order", ["graph", "barriers"])
def test_a_failing_prompt_is_recorded_and_holds_no_other(tmp_path: Path, order: str) -> None:
    store, events = open_store(str(tmp_path)), []
    stages = [
        Sleep("synthesis", store, {"bad": 0.3}, events, fail="bad"),
        Sleep("training", store, {}, events),
        Sleep("evaluation", store, {}, events),
    ]
    chains = _chains("bad", "good")
    _run(store, stages, chains, order)

    bad, good = (c.result for c in chains)
    assert (bad.status, bad.stage, bad.error) == ("failed", "synthesis", "RuntimeError: synthesis broke on bad")
    assert chains[1].finished == 3 and good.status != "failed"
    assert not [e for e in events if e[1] == "bad" and e[0] != "synthesis"]


def test_a_done_unit_is_found_not_run_and_a_held_one_fails_its_prompt(tmp_path: Path) -> None:
    store, events = open_store(str(tmp_path)), []
    stages = [Sleep("synthesis", store, {}, events), Sleep("training", store, {}, events)]
    _run(store, stages, _chains("a", "b"), "graph")
    assert len(events) == 4

    events.clear()
    store.delete_prefix("fake/training/b")
    store = open_store(str(tmp_path))  # a new job's store object (one verifies each marker once)
    stages = [Sleep("synthesis", store, {}, events), Sleep("training", store, {}, events)]
    other = Leases(store)  # another job is training b
    other.take("fake/training/b", "training of b")
    try:
        chains = _chains("a", "b")
        _run(store, stages, chains, "graph")
    finally:
        other.close()
    assert events == []  # a was found whole; b's training is held by the other job
    assert chains[0].finished == 2 and chains[1].result.stage == "training"
    assert "in progress in another job" in chains[1].result.error


def test_units_of_one_stage_run_side_by_side(tmp_path: Path) -> None:
    store, events = open_store(str(tmp_path)), []
    running, peak, lock = [0], [0], threading.Lock()

    class Counting(Sleep):
        def _work(self, prompt: str, prefix: str) -> str:
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            try:
                return super()._work(prompt, prefix)
            finally:
                with lock:
                    running[0] -= 1

    _run(store, [Counting("training", store, dict.fromkeys("abcd", 0.2), events)], _chains(*"abcd"), "graph")
    assert peak[0] == 4


TIMED = ("latency_s", "latency_total_s", "measured_saving_vs_kv_reuse", "measured_saving_vs_recompute")


def _stored(store: ArtifactStore) -> dict[str, bytes]:
    """Every stored key of the prompts and adapters with its bytes, the store's own location left
    out; what carries a wall-clock time (training metrics and summaries, the measured latencies in
    efficiency figures, the Markdown and plot made from them, markers vouching for them) only by
    name. PEFT writes ``target_modules`` from a set, in an order that varies between processes."""
    import json

    out = {}
    for key in store.list_keys("prompts") + store.list_keys("adapters"):
        name = key.rsplit("/", 1)[-1]
        data = store.get_bytes(key).replace(store.url.encode(), b"<store>")
        if name in ("_SUCCESS", "metrics.json", "summary.json", "efficiency.json", "efficiency.png", "report.md"):
            data = b""
        elif name == "report.json" and "/eval/" in key:
            report = json.loads(data)
            report["efficiency"] = {k: v for k, v in report["efficiency"].items() if k not in TIMED}
            data = json.dumps(report, sort_keys=True).encode()
        elif name == "adapter_config.json":
            config = json.loads(data)
            config["target_modules"] = sorted(config["target_modules"])
            data = json.dumps(config, sort_keys=True).encode()
        out[key] = data
    return out


@pytest.mark.slow  # ~3.5 min on 2 cores: make test-cluster
@pytest.mark.timeout(900)
def test_the_graph_stores_the_same_bytes_as_the_barrier_order(tmp_path: Path) -> None:
    """Two prompts on the tiny model through Ray, once as a graph and once stage-major: the same store
    keys, and the same records, adapters, episodes, scores and reports byte for byte."""
    from genpi import ray_runtime
    from genpi.batch.graph import run_batch
    from genpi.batch.timeline import Timeline
    from genpi.config import RayConfig, load_config
    from genpi.prompt.files import load_prompts
    from tests.batch.command import TINY_CONFIG
    from tests.repo import ROOT

    specs = load_prompts(ROOT / "prompts")[:2]
    stored, timelines = {}, {}
    ray_runtime.connect(RayConfig(num_cpus=2, dashboard=False))
    try:
        for order in ("barriers", "graph"):
            store = open_store(str(tmp_path / order))
            cfg = load_config("local", overrides={**TINY_CONFIG, "store.url": store.url})
            timelines[order] = Timeline()
            results = run_batch(specs, cfg, store, order=order, timeline=timelines[order])
            assert [r.status for r in results] == ["done", "done"], [r.error for r in results]
            stored[order] = _stored(store)
    finally:
        ray_runtime.disconnect()
    assert sorted(stored["graph"]) == sorted(stored["barriers"])
    from genpi import registry

    texts = registry.prompt_texts(open_store(str(tmp_path / "graph")))  # what a server answers in prompt mode
    assert texts == {s.name: {s.prompt_hash: s} for s in specs}
    assert any(k.endswith("records.jsonl") for k in stored["graph"])
    assert any(k.endswith("adapter_model.safetensors") for k in stored["graph"])
    differ = [k for k in stored["graph"] if stored["graph"][k] != stored["barriers"][k]]
    assert not differ, differ
    assert set(timelines["graph"].busy_shares()) == {"synthesis", "training", "evaluation"}


def test_a_prompt_too_long_for_the_target_fails_alone() -> None:
    from genpi.batch.graph import too_long
    from genpi.config import load_config
    from genpi.prompt.files import load_prompts
    from tests.batch.command import TINY_CONFIG
    from tests.repo import ROOT

    cfg = load_config("local", overrides={**TINY_CONFIG, "models.target.max_context": 600})
    shell = next(s for s in load_prompts(ROOT / "prompts") if s.name == "shell-agent")
    errors = too_long([mini_spec(), shell], cfg)
    assert list(errors) == ["shell-agent"] and "shorten the prompt" in str(errors["shell-agent"])


class Hung(Sleep):
    """A training stage whose unit for ``prompt`` never returns in time; limited to ``limit`` seconds."""

    timeout_flag = "train.timeout_s"

    def __init__(self, store: ArtifactStore, events: list, hung: str, limit: float) -> None:
        super().__init__("training", store, {hung: 30.0}, events)
        self.limit, self.cancelled = limit, []

    @property
    def timeout_s(self) -> float:
        return self.limit

    def cancel(self, future: Future) -> None:
        self.cancelled.append(future)


def test_a_unit_past_its_time_is_cancelled_and_fails_only_its_prompt(tmp_path: Path) -> None:
    store, events = open_store(str(tmp_path)), []
    hung = Hung(store, events, "stuck", limit=0.5)
    chains = _chains("stuck", "fine")
    started = time.monotonic()
    _run(store, [Sleep("synthesis", store, {}, events), hung], chains, "graph")

    assert time.monotonic() - started < 10  # not the hung unit's 30 s
    stuck, fine = chains
    assert fine.finished == 2 and fine.result.status == "pending"
    assert stuck.result.status == "failed" and stuck.result.stage == "training"
    assert "did not finish within 0.5 s (train.timeout_s)" in stuck.result.error
    assert len(hung.cancelled) == 1 and not store.is_done("fake/training/stuck")
    hung.pool.shutdown(wait=False, cancel_futures=True)
