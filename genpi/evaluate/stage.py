"""The evaluate stage for one prompt, with a fixed lifecycle:

episodes → teacher-forced scores → efficiency → report → gate → publish.

Three systems answer the same held-out inputs: the **teacher** (target model with the prompt),
the **base** (no prompt, no adapter) and the **adapter** (no prompt, the trained LoRA adapter).
Each plays the agent for up to ``eval.max_turns`` turns against the environment persona (played
by the base model, as in synthesis). Inputs are the synthesized records of the test split and,
when the user supplied them, real inputs. Every step stores its results under the evaluation's
key, so an interrupted evaluation resumes and a finished one is found and reused.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from genpi import layout
from genpi.config import GenPIConfig
from genpi.conversations import student_messages, teacher_messages
from genpi.engines.base import SamplingParams
from genpi.episodes import play_episodes
from genpi.evaluate import efficiency
from genpi.evaluate.embedding import load_embedder
from genpi.evaluate.gate import gate_decision, publish
from genpi.evaluate.report import prompt_report_markdown, summarize_set
from genpi.evaluate.teacher_forced import score_replies
from genpi.prompts import PromptSpec
from genpi.splits import assign_splits
from genpi.store import ArtifactStore

log = logging.getLogger(__name__)

SYSTEMS = ("teacher", "base", "adapter")


def evaluation_inputs(spec: PromptSpec, cfg: GenPIConfig, store: ArtifactStore,
                      user_inputs: list[str]) -> dict[str, list[str]]:
    """The input sets: the test split of the synthesized records, and the user's real inputs."""
    records = store.get_jsonl(f"{layout.synth_prefix(spec, cfg)}/records.jsonl")
    split = assign_splits([r["id"] for r in records], cfg.split.val_fraction, cfg.split.test_fraction,
                          cfg.split.seed)
    sets = {"test": [r["input"] for r in records if split[r["id"]] == "test"][:cfg.eval.max_samples]}
    if user_inputs:
        sets["user"] = user_inputs[:cfg.eval.max_samples]
    return sets


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

    def __init__(self, spec: PromptSpec, cfg: GenPIConfig, store: ArtifactStore, engine: Any,
                 adapter: str, user_inputs: list[str], log_line: Callable[[str], None]) -> None:
        self.spec, self.cfg, self.store, self.engine, self.adapter = spec, cfg, store, engine, adapter
        self.prefix = layout.eval_prefix(spec, cfg, user_inputs)
        self.sets = evaluation_inputs(spec, cfg, store, user_inputs)
        self.log = log_line
        limit = cfg.eval.max_turns or spec.max_turns
        self.limit = min(limit, spec.max_turns)

    def _stored(self, key: str, produce: Callable[[], Any], jsonl: bool = True) -> Any:
        full = f"{self.prefix}/{key}"
        if self.store.exists(full):
            return self.store.get_jsonl(full) if jsonl else self.store.get_json(full)
        value = produce()
        (self.store.put_jsonl if jsonl else self.store.put_json)(full, value)
        return value

    def episodes(self, set_name: str, system: str) -> list[dict]:
        """Each input's episode with ``system`` as the agent (stored per set and system)."""
        inputs = self.sets[set_name]

        def play() -> list[dict]:
            started = time.time()
            adapter = self.adapter if system == "adapter" else None
            views = [teacher_messages(self.spec, x) if system == "teacher" else student_messages(x) for x in inputs]
            ev = self.cfg.eval

            def agent(conversations, params):
                return self.engine.generate(conversations, params, [adapter] * len(conversations))

            def environment(conversations, params):
                return self.engine.generate(conversations, params, [None] * len(conversations))

            out = play_episodes(self.spec, inputs, views, agent, environment, self.limit,
                                SamplingParams(max_new_tokens=ev.max_tokens, temperature=0.0),
                                SamplingParams(max_new_tokens=ev.env_max_tokens, temperature=0.0,
                                               stop=(self.spec.environment.end_token,)))
            turns = sum(len(e["turns"]) for e in out)
            self.log(f"{set_name} episodes, {system}: {len(out)} episodes, {turns} agent turns in "
                     f"{time.time() - started:.0f}s")
            return [{"input": x, **e} for x, e in zip(inputs, out)]

        return self._stored(f"episodes/{set_name}-{system}.jsonl", play)

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
            scored = score_replies(self.engine, teacher_ctx, student_ctx, replies,
                                   {"base": None, "adapter": self.adapter}, self.cfg.eval.top_k)
            for i, row in enumerate(rows):
                for system, values in scored.items():
                    row[system] = vars(values[i])
            self.log(f"{set_name} teacher-forced scores: {len(rows)} teacher turns in {time.time() - started:.0f}s")
            return rows

        return self._stored(f"scores/{set_name}.jsonl", score)

    def efficiency(self, teacher_episodes: list[dict]) -> dict[str, Any]:
        """Prompt tokens avoided, analytic prefill FLOPs and measured latency per turn of one episode."""

        def measure() -> dict[str, Any]:
            return measure_efficiency(self.spec, self.cfg, self.engine, self.adapter, teacher_episodes)

        return self._stored("efficiency.json", measure, jsonl=False)


def measure_efficiency(spec: PromptSpec, cfg: GenPIConfig, engine: Any, adapter: str,
                       teacher_episodes: list[dict]) -> dict[str, Any]:
    """The paper's section 8 for one prompt: what leaving the prompt out saves per turn.

    The timed episode replays the teacher's longest test episode (its turns repeated up to
    ``eval.latency_turns``), so all three ways of serving it process the same turns.
    """
    tokenizer, ev = engine.tokenizer, cfg.eval
    longest = max(teacher_episodes, key=lambda e: len(e["turns"]))
    exchanges = [((longest["input"] if t == 0 else longest["turns"][t - 1]["observation"]) or "(no output)",
                  turn["agent"]) for t, turn in enumerate(longest["turns"])] or [(longest["input"], "")]
    turns = [exchanges[t % len(exchanges)] for t in range(ev.latency_turns)]

    def count(messages: list[dict], generation_prompt: bool) -> int:
        return len(tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                                tokenize=True, return_dict=True)["input_ids"])

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
    flops = efficiency.episode_prefill_flops(engine.model.config, prompt_tokens, turn_tokens,
                                             **_lora_shape(engine, adapter))
    latency: dict[str, list[float]] = {}
    for mode in ("recompute", "kv_reuse", "adapter"):
        with engine.adapter_scope(adapter if mode == "adapter" else None) as model:
            prompt = [] if mode == "adapter" else [{"role": t.role, "content": t.content} for t in spec.turns]
            latency[mode] = efficiency.measure_episode_latency(model, tokenizer, prompt, turns,
                                                               ev.latency_tokens, mode)
    totals = {mode: sum(values) for mode, values in latency.items()}

    def saving(baseline: str) -> float | None:
        return round(1 - totals["adapter"] / totals[baseline], 4) if totals[baseline] else None

    return {"prompt_tokens": prompt_tokens, "turns": len(turns), "turn_tokens": turn_tokens, "flops": flops,
            "latency_s": latency, "latency_total_s": {m: round(v, 4) for m, v in totals.items()},
            "measured_saving_vs_kv_reuse": saving("kv_reuse"),
            "measured_saving_vs_recompute": saving("recompute"),
            "device": str(engine.model.device), "threads": torch.get_num_threads()}


def _lora_shape(engine: Any, adapter: str) -> dict[str, Any]:
    """LoRA rank and adapted layer count of a loaded adapter, for the FLOPs formula."""
    config = engine.model.peft_config[engine.adapters[adapter]]
    layers = config.layers_to_transform
    return {"lora_rank": int(config.r), "lora_layers": len(layers) if layers else None}


def evaluate_prompt(spec: PromptSpec, cfg: GenPIConfig, store: ArtifactStore, user_inputs: list[str]) -> dict:
    """Evaluate (or find) the adapter of ``spec``; gate it and publish it when it passes. Returns the report."""
    from genpi.engines.hf import HFEngine

    prefix = layout.eval_prefix(spec, cfg, user_inputs)
    if store.is_done(prefix):
        log.info("[%s] evaluation found at %s", spec.name, store.location(prefix))
        return store.get_json(f"{prefix}/report.json")
    if cfg.eval.threads or not torch.cuda.is_available():
        torch.set_num_threads(cfg.eval.threads or os.cpu_count() or 1)
    train = layout.train_prefix(spec, cfg)
    target = cfg.models.target
    engine = HFEngine(target.name, dtype=target.dtype, device="auto", batch_size=cfg.eval.batch_size,
                      max_context=target.max_context, prefix_sharing=target.prefix_sharing)
    with tempfile.TemporaryDirectory(prefix="genpi-eval-") as tmp:
        folder = store.download_dir(f"{train}/adapter", Path(tmp) / "adapter")
        adapter = engine.add_adapter(folder)
        run = Evaluation(spec, cfg, store, engine, adapter, user_inputs,
                         lambda line: log.info("[%s] %s", spec.name, line))
        sets: dict[str, Any] = {}
        efficiency_figures: dict[str, Any] = {}
        for set_name, inputs in run.sets.items():
            if not inputs:
                continue
            episodes = {system: run.episodes(set_name, system) for system in SYSTEMS}
            scores = run.scores(set_name, episodes["teacher"])
            sets[set_name] = summarize_set(spec, episodes, scores, load_embedder())
            if set_name == "test" or not efficiency_figures:
                efficiency_figures = run.efficiency(episodes["teacher"])
    report: dict[str, Any] = {
        "prompt": spec.name, "prompt_hash": spec.prompt_hash, "source": spec.source,
        "adapter": store.location(f"{train}/adapter"), "run_hash": layout.run_hash(cfg),
        "eval_key": prefix.rsplit("/", 1)[-1], "location": store.location(f"{prefix}/report.md"),
        "max_turns": run.limit, "sets": sets,
        "efficiency": efficiency_figures}
    report["gate"] = gate_decision(report, cfg.eval)
    report["published"] = publish(spec, cfg, store, report) if report["gate"]["passed"] else None
    from genpi.evaluate.plots import efficiency_plot, retention_plot

    first = sets.get("test") or next(iter(sets.values()), None)
    if first:
        rows = [{"metric": m, "retention": v["retention"], "n": v["n"]} for m, v in first["comparison"].items()]
        store.put_bytes(f"{prefix}/retention.png", retention_plot(spec.name, rows, cfg.eval.min_retention))
    if efficiency_figures:
        store.put_bytes(f"{prefix}/efficiency.png", efficiency_plot(
            spec.name, efficiency_figures["flops"]["per_turn"], efficiency_figures["latency_s"]))
    store.put_json(f"{prefix}/report.json", report)
    store.put_text(f"{prefix}/report.md", prompt_report_markdown(report))
    store.mark_done(prefix, {"passed": report["gate"]["passed"]})
    verdict = "passed" if report["gate"]["passed"] else "failed: " + report["gate"]["summary"]
    log.info("[%s] evaluation done (%s): %s", spec.name, verdict, store.location(f"{prefix}/report.md"))
    return report
