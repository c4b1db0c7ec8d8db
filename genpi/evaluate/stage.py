"""The evaluate stage for one prompt, with a fixed lifecycle:

episodes → teacher-forced scores → efficiency → report → gate → publish.

Three systems answer the same held-out inputs: the **teacher** (target model with the prompt),
the **base** (no prompt, no adapter) and the **adapter** (no prompt, the trained LoRA adapter).
Each plays the agent for up to ``eval.max_turns`` turns against the environment persona (played
by the base model, as in synthesis). Inputs are the synthesized records of the test split and,
when the user supplied them, real inputs. The teacher's and the base's episodes and the teacher's
samples do not depend on the adapter: they are the prompt's references
(:mod:`genpi.evaluate.references`), which the batch makes while synthesizing and an evaluation
that finds none makes first. Every step stores its results under the evaluation's key, so an
interrupted evaluation resumes and a finished one is found and reused.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from genpi import artifacts, parity, registry
from genpi.chat import chat_ids
from genpi.config import GenPIConfig
from genpi.devices import cpu_threads
from genpi.embeddings import load_embedder
from genpi.errors import ModelError
from genpi.evaluate import efficiency
from genpi.evaluate.gate import gate_decision
from genpi.evaluate.metrics import action_text
from genpi.evaluate.plots import efficiency_plot, retention_plot
from genpi.evaluate.references import (
    evaluation_inputs,
    make_references,
    play_together,
    split_items,
    turn_limit,
)
from genpi.evaluate.report import prompt_report_markdown, summarize_set
from genpi.evaluate.teacher_forced import score_replies
from genpi.prompt.spec import PromptSpec
from genpi.prompt.splits import VAL
from genpi.prompt.views import student_messages, teacher_messages
from genpi.store import ArtifactStore

log = logging.getLogger(__name__)

SYSTEMS = ("teacher", "base", "adapter")


def _history(turns: list[dict], upto: int) -> list[dict[str, str]]:
    """The messages an agent has seen after ``upto`` finished turns of an episode."""
    messages = []
    for turn in turns[:upto]:
        messages.append({"role": "assistant", "content": turn["agent"]})
        if turn["observation"]:
            messages.append({"role": "user", "content": turn["observation"]})
    return messages


class Evaluation:
    """One prompt's evaluation of one adapter, step by step, each step stored."""

    def __init__(
        self,
        spec: PromptSpec,
        cfg: GenPIConfig,
        store: ArtifactStore,
        engine: Any,
        adapter: str,
        prefix: str,
        real_inputs: list[str],
        log_line: Callable[[str], None],
        sets: dict[str, list[dict]] | None = None,
        references: str = "",
    ) -> None:
        self.spec, self.cfg, self.store, self.engine, self.adapter = spec, cfg, store, engine, adapter
        self.prefix, self.references = prefix, references
        self.sets = sets if sets is not None else evaluation_inputs(spec, cfg, store, real_inputs)
        self.log = log_line
        self.limit = turn_limit(spec, cfg)

    def _stored(self, key: str, produce: Callable[[], Any], jsonl: bool = True) -> Any:
        full = f"{self.prefix}/{key}"
        if self.store.exists(full):
            return self.store.get_jsonl(full) if jsonl else self.store.get_json(full)
        value = produce()
        (self.store.put_jsonl if jsonl else self.store.put_json)(full, value)
        return value

    def episodes(self, set_name: str, system: str) -> list[dict]:
        """Each input's episode with ``system`` as the agent: the teacher's and the base's from the
        references where they hold the set, else played here, every set at once (one generate call
        per turn) and stored per set and system."""
        reference = f"{self.references}/{set_name}-{system}.jsonl"
        if system != "adapter" and self.references and self.store.exists(reference):
            return self.store.get_jsonl(reference)
        key = f"{self.prefix}/episodes/{set_name}-{system}.jsonl"
        if not self.store.exists(key):
            self._play(system)
        return self.store.get_jsonl(key)

    def _play(self, system: str) -> None:
        """Play ``system``'s episodes of every set not stored yet, together, and store each set's."""
        todo = [
            name
            for name, items in self.sets.items()
            if items and not self.store.exists(f"{self.prefix}/episodes/{name}-{system}.jsonl")
        ]
        started = time.time()
        adapter = self.adapter if system == "adapter" else None

        def agent(conversations, params):
            return self.engine.generate(conversations, params, [adapter] * len(conversations))

        sets = {name: self.sets[name] for name in todo}
        played = play_together(self.spec, self.cfg, sets, (system,), agent, self.engine.generate)[system]
        for name, episodes in played.items():
            self.store.put_jsonl(f"{self.prefix}/episodes/{name}-{system}.jsonl", episodes)
        episodes = [e for eps in played.values() for e in eps]
        self.log(
            f"episodes of the {system} on {', '.join(todo)}: {len(episodes)} episodes, "
            f"{sum(len(e['turns']) for e in episodes)} agent turns in {time.time() - started:.0f}s"
        )

    def scores(self, set_name: str, teacher_episodes: list[dict]) -> list[dict]:
        """Teacher-forced NLL and top-k KL of every teacher turn under each system."""

        def score() -> list[dict]:
            started = time.time()
            rows, teacher_ctx, student_ctx, replies = [], [], [], []
            for k, episode in enumerate(teacher_episodes):
                for t, turn in enumerate(episode["turns"]):
                    history = _history(episode["turns"], t)
                    teacher_ctx.append(teacher_messages(self.spec, episode["input"]) + history)
                    student_ctx.append(student_messages(episode["input"]) + history)
                    replies.append(turn["agent"])
                    rows.append({"episode": k, "turn": t})
            scored = score_replies(
                self.engine,
                teacher_ctx,
                student_ctx,
                replies,
                {"base": None, "adapter": self.adapter},
                self.cfg.eval.top_k,
            )
            for i, row in enumerate(rows):
                for system, values in scored.items():
                    row[system] = vars(values[i])
            self.log(f"{set_name} teacher-forced scores: {len(rows)} teacher turns in {time.time() - started:.0f}s")
            return rows

        return self._stored(f"scores/{set_name}.jsonl", score)

    def agreement(self, set_name: str, episodes: dict[str, list[dict]]) -> list[dict]:
        """Whether the teacher would say what each system says, per input: the teacher-forced NLL of
        each system's first reply under the teacher (the model with the prompt), and whether its first
        action is among the actions of the teacher's samples in the references."""

        def judge() -> list[dict]:
            started = time.time()
            ev, fmt = self.cfg.eval, self.spec.action_format
            inputs = [e["input"] for e in episodes["teacher"]]
            contexts = [teacher_messages(self.spec, x) for x in inputs]
            firsts = {s: [e["turns"][0]["agent"] if e["turns"] else "" for e in episodes[s]] for s in SYSTEMS}
            # One call for every system's replies: the prompt's KV once, rows batched across systems.
            judged = score_replies(
                self.engine, contexts * len(SYSTEMS), [], [r for s in SYSTEMS for r in firsts[s]], {}, ev.top_k
            )
            nll = {s: judged["teacher"][k * len(inputs) : (k + 1) * len(inputs)] for k, s in enumerate(SYSTEMS)}
            samples = self.store.get_jsonl(f"{self.references}/{set_name}-samples.jsonl")
            rows = []
            for i in range(len(inputs)):
                actions = {action_text(fmt, text) for text in samples[i]["samples"]} - {None}
                rows.append(
                    {
                        "nll_under_teacher": {
                            s: {"tokens": nll[s][i].tokens, "nll_sum": nll[s][i].nll_sum} for s in SYSTEMS
                        },
                        "teacher_actions": sorted(actions),
                        "in_teacher_samples": {s: action_text(fmt, firsts[s][i]) in actions for s in SYSTEMS},
                    }
                )
            self.log(
                f"{set_name} agreement under the teacher: {len(rows)} inputs, {ev.teacher_samples} teacher samples each, "
                f"{time.time() - started:.0f}s"
            )
            return rows

        return self._stored(f"agreement/{set_name}.jsonl", judge)

    def efficiency(self, teacher_episodes: list[dict]) -> dict[str, Any]:
        """Prompt tokens avoided, analytic prefill FLOPs and measured latency per turn of one episode."""

        def measure() -> dict[str, Any]:
            return measure_efficiency(self.spec, self.cfg, self.engine, self.adapter, teacher_episodes)

        return self._stored("efficiency.json", measure, jsonl=False)


def measure_efficiency(
    spec: PromptSpec, cfg: GenPIConfig, engine: Any, adapter: str, teacher_episodes: list[dict]
) -> dict[str, Any]:
    """The paper's section 8 for one prompt: what leaving the prompt out saves per turn.

    The timed episode replays the teacher's longest test episode (its turns repeated up to
    ``eval.latency_turns``), so all three ways of serving it process the same turns.
    """
    tokenizer, ev = engine.tokenizer, cfg.eval
    longest = max(teacher_episodes, key=lambda e: len(e["turns"]))
    exchanges = [
        ((longest["input"] if t == 0 else longest["turns"][t - 1]["observation"]) or "(no output)", turn["agent"])
        for t, turn in enumerate(longest["turns"])
    ] or [(longest["input"], "")]
    turns = [exchanges[t % len(exchanges)] for t in range(ev.latency_turns)]

    def count(messages: list[dict], generation_prompt: bool) -> int:
        return len(chat_ids(tokenizer, messages, generation_prompt))

    prompt_tokens = count(teacher_messages(spec, ""), True) - count(student_messages(""), True)
    turn_tokens: list[tuple[int, int]] = []
    history: list[dict[str, str]] = []
    before = 0
    for said, reply in turns:
        history.append({"role": "user", "content": said})
        asked = count(history, True)
        history.append({"role": "assistant", "content": reply})
        after = count(history, False)
        turn_tokens.append((asked - before, after - asked))  # read (with framing), written (with end of turn)
        before = after
    flops = efficiency.episode_prefill_flops(
        engine.model.config, prompt_tokens, turn_tokens, **engine.adapter_shape(adapter)
    )
    latency: dict[str, list[float]] = {}
    for mode in ("recompute", "kv_reuse", "adapter"):
        with engine.adapter_scope(adapter if mode == "adapter" else None) as model:
            prompt = [] if mode == "adapter" else [{"role": t.role, "content": t.content} for t in spec.turns]
            latency[mode] = efficiency.measure_episode_latency(model, tokenizer, prompt, turns, ev.latency_tokens, mode)
    totals = {mode: sum(values) for mode, values in latency.items()}

    def saving(baseline: str) -> float | None:
        return round(1 - totals["adapter"] / totals[baseline], 4) if totals[baseline] else None

    return {
        "prompt_tokens": prompt_tokens,
        "turns": len(turns),
        "turn_tokens": turn_tokens,
        "flops": flops,
        "latency_s": latency,
        "latency_total_s": {m: round(v, 4) for m, v in totals.items()},
        "measured_saving_vs_kv_reuse": saving("kv_reuse"),
        "measured_saving_vs_recompute": saving("recompute"),
        "device": str(engine.model.device),
        "threads": torch.get_num_threads(),
    }


def _embedder() -> Any:
    """The MiniLM embedder, or None (no embedding-similarity figure) when its package is missing."""
    try:
        return load_embedder()
    except ModelError as e:
        log.warning("no embedding similarity in this evaluation: %s", e)
        return None


def eval_device(cfg: GenPIConfig) -> str:
    """The evaluation task's device: cpu where the target is set to cpu, else the task's GPU when
    Ray gave it one (``eval.num_gpus``)."""
    return "cpu" if cfg.models.target.device == "cpu" else "auto"


def evaluation_engine(cfg: GenPIConfig) -> Any:
    """The target model for evaluation, on this task's threads; adapters are added to it per run
    and run merged into the weights (the unmerged LoRA path is slower per token)."""
    from genpi.engines.hf import HFEngine

    if cfg.eval.threads or not torch.cuda.is_available():
        torch.set_num_threads(cpu_threads(cfg.eval.threads))
    target = cfg.models.target
    return HFEngine(
        target.name,
        dtype=target.dtype,
        device=eval_device(cfg),
        batch_size=cfg.eval.batch_size,
        max_context=target.max_context,
        prefix_sharing=target.prefix_sharing,
        max_merged=1,  # the adapter's weights merged, as the server runs them: base-model speed
    )


def validation_summary(spec: PromptSpec, cfg: GenPIConfig, store: ArtifactStore, engine: Any, adapter: str) -> dict:
    """One run's adapter on the validation split: first-turn figures and teacher-forced scores of
    the three systems (:func:`summarize_set`), stored under the run's validation key."""
    prefix = artifacts.validation_prefix(spec, cfg)
    if store.is_done(prefix):
        return store.get_json(f"{prefix}/summary.json")
    run = Evaluation(
        spec,
        cfg,
        store,
        engine,
        adapter,
        prefix,
        [],
        lambda line: log.info("[%s] %s", spec.name, line),
        sets={"val": split_items(spec, cfg, store, VAL)},
    )
    summary: dict[str, Any] = {"n": 0}
    if run.sets["val"]:
        episodes = {system: run.episodes("val", system) for system in SYSTEMS}
        summary = summarize_set(spec, episodes, run.scores("val", episodes["teacher"]))
    store.put_json(f"{prefix}/summary.json", summary)
    store.mark_done(prefix)
    return summary


def evaluate_prompt(spec: PromptSpec, cfg: GenPIConfig, store: ArtifactStore, real_inputs: list[str]) -> dict:
    """Evaluate (or find) the adapter of ``spec``; gate it and publish it when it passes. Returns the report."""
    prefix = artifacts.eval_prefix(spec, cfg, real_inputs)
    if store.is_done(prefix):
        log.info("[%s] evaluation found at %s", spec.name, store.location(prefix))
        return store.get_json(f"{prefix}/report.json")
    train = artifacts.train_prefix(spec, cfg)
    engine = evaluation_engine(cfg)
    with tempfile.TemporaryDirectory(prefix="genpi-eval-") as tmp:
        adapter = engine.add_adapter(store.download_dir(f"{train}/adapter", Path(tmp) / "adapter"))
        say = lambda line: log.info("[%s] %s", spec.name, line)  # noqa: E731
        references = make_references(spec, cfg, store, engine, real_inputs, say)  # found when the batch made them
        run = Evaluation(spec, cfg, store, engine, adapter, prefix, real_inputs, say, references=references)
        sets: dict[str, Any] = {}
        efficiency_figures: dict[str, Any] = {}
        embedder = _embedder()
        for set_name, items in run.sets.items():
            if not items:
                continue
            episodes = {system: run.episodes(set_name, system) for system in SYSTEMS}
            scores = run.scores(set_name, episodes["teacher"])
            sampled = store.exists(f"{references}/{set_name}-samples.jsonl")  # the test split's, where actions exist
            agreement = run.agreement(set_name, episodes) if sampled else None
            sets[set_name] = summarize_set(spec, episodes, scores, embedder, agreement=agreement)
            if set_name == "test" or not efficiency_figures:
                efficiency_figures = run.efficiency(episodes["teacher"])
    report: dict[str, Any] = {
        "prompt": spec.name,
        "prompt_hash": spec.prompt_hash,
        "source": spec.source,
        "adapter": store.location(f"{train}/adapter"),
        "run_hash": artifacts.run_hash(cfg),
        "eval_key": prefix.rsplit("/", 1)[-1],
        "location": store.location(f"{prefix}/report.md"),
        "max_turns": run.limit,
        "sets": sets,
        "efficiency": efficiency_figures,
    }
    report["gate"] = gate_decision(report, cfg.eval)
    if report["gate"]["passed"]:
        inputs = [item["input"] for item in run.sets.get("test", [])] or list(spec.example_inputs)
        report["published"] = publish_run(spec, cfg, store, report, record_probes(cfg, store, train, inputs))
    else:
        report["published"] = None

    first = sets.get("test") or next(iter(sets.values()), None)
    if first:
        rows = [{"metric": m, "retention": v["retention"], "n": v["n"]} for m, v in first["comparison"].items()]
        store.put_bytes(f"{prefix}/retention.png", retention_plot(spec.name, rows, cfg.eval.min_retention))
    if efficiency_figures:
        store.put_bytes(
            f"{prefix}/efficiency.png",
            efficiency_plot(spec.name, efficiency_figures["flops"]["per_turn"], efficiency_figures["latency_s"]),
        )
    store.put_json(f"{prefix}/report.json", report)
    store.put_text(f"{prefix}/report.md", prompt_report_markdown(report))
    store.mark_done(prefix, {"passed": report["gate"]["passed"]})
    verdict = "passed" if report["gate"]["passed"] else "failed: " + report["gate"]["summary"]
    log.info("[%s] evaluation done (%s): %s", spec.name, verdict, store.location(f"{prefix}/report.md"))
    return report


def record_probes(cfg: GenPIConfig, store: ArtifactStore, train: str, inputs: list[str]) -> list[dict[str, Any]]:
    """The run's adapter's greedy answers to the parity probes (:mod:`genpi.parity`), in float32."""
    from genpi.engines.hf import HFEngine

    target = cfg.models.target
    engine = HFEngine(
        target.name, dtype=parity.PROBE_DTYPE, device=eval_device(cfg), max_context=target.max_context, turn_cache_mib=0
    )
    with tempfile.TemporaryDirectory(prefix="genpi-probes-") as tmp:
        adapter = engine.add_adapter(store.download_dir(f"{train}/adapter", Path(tmp) / "adapter"))
        return parity.record(engine, adapter, inputs)


def publish_run(
    spec: PromptSpec,
    cfg: GenPIConfig,
    store: ArtifactStore,
    report: dict[str, Any],
    probes: list[dict[str, Any]] | None = None,
) -> str:
    """Publish the evaluated run's adapter through the registry, with its parity ``probes``; returns where it lives."""
    test = report["sets"].get("test", {}).get("comparison", {})
    entry = registry.publish(
        store,
        f"{artifacts.train_prefix(spec, cfg)}/adapter",
        registry.PublishedAdapter(
            prompt=spec.name,
            version=artifacts.published_version(spec, cfg),
            prompt_hash=spec.prompt_hash,
            run_hash=artifacts.run_hash(cfg),
            base_model=cfg.models.target.name,
            published_at="",
            report=report["location"],
            gate=report["gate"],
            retention={m: row["retention"] for m, row in test.items()},
            gap_closed={m: row["gap_closed"] for m, row in test.items()},
            probes=list(probes or []),
        ),
    )
    return store.location(entry.prefix)
