"""Self Role-Playing synthesis: the authors' way against both of our backends, side by side in one
run, on the same model, prompt, inputs and settings (greedy).

- one_at_a_time (the baseline): one conversation at a time, two generate calls per turn, as the
  authors' released scripts; transformers with its own KV cache;
- hf (ours): every open conversation advances together, one call per persona per turn; the
  prompt's KV cache computed once per batch and written in place; each conversation's KV kept
  between turns, so a turn prefills only its new tokens (``hf_whole_history``: the same without
  that, every turn prefilling each conversation's history again);
- vllm (ours): the same episodes on the vLLM backend (continuous batching, prefix caching), in its
  engine actor on `.venv-vllm` (skipped with a reason when `make install-vllm` has not run).

For each backend the bench also times its raw batched generate at the same batch size (one call,
the agents' first turns) and says what share of that throughput role play keeps, and it projects
the target's work for 1,000 samples of one prompt (each sample: a role play as here, plus the
student's and the teacher's single-turn outputs at the token limit) at the best backend's rate.

On a GPU, ``--model random-llama-3-8b`` gives the paper's 8B target shape with random weights
(every turn then runs to its token limit), and ``--baseline-inputs`` times the one-at-a-time
baseline on fewer conversations: its cost per conversation does not depend on how many there are.

    .venv/bin/python bench/synthesis.py [--model smollm2-135m-instruct] [--inputs 32] [--turns 2]

The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genpi.config import ModelConfig, RayConfig, SynthConfig  # noqa: E402
from genpi.engines.base import SamplingParams  # noqa: E402
from genpi.engines.environments import vllm_python  # noqa: E402
from genpi.engines.hf import HFEngine  # noqa: E402
from genpi.prompt.files import load_prompt  # noqa: E402
from genpi.prompt.views import teacher_messages  # noqa: E402
from genpi.synth.roleplay import role_play  # noqa: E402

TASKS = [
    "Count the regular files under /var/log.",
    "Which process uses the most memory right now?",
    "Print the kernel version.",
    "How many users have a login shell of /bin/bash?",
    "Find the largest file in /etc.",
    "How much free space is left on /?",
    "List the listening TCP ports.",
    "What time zone is this machine set to?",
]


class Counted:
    """An engine that counts the tokens it generates."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.tokens = engine, 0

    def generate(self, conversations, params, adapters=None):
        out = self.engine.generate(conversations, params, adapters)
        self.tokens += sum(g.output_tokens for g in out)
        return out


PROJECTED_SAMPLES = 1000  # one prompt's data in the paper


def timed_role_play(spec, cfg, engine, inputs, batched: bool) -> tuple[float, int, list[dict]]:
    counted = Counted(engine)
    start = time.perf_counter()
    out = (
        role_play(spec, cfg, counted, inputs)
        if batched
        else [role_play(spec, cfg, counted, [record])[0] for record in inputs]
    )
    return time.perf_counter() - start, counted.tokens, out


def raw_throughput(engine: Any, spec, inputs: list[dict], max_tokens: int) -> float:
    """Generated tokens/s of one batched call: every agent's first turn."""
    conversations = [teacher_messages(spec, r["input"]) for r in inputs]
    start = time.perf_counter()
    out = engine.generate(conversations, SamplingParams(max_new_tokens=max_tokens))
    return sum(g.output_tokens for g in out) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompt", default="prompts/shell-agent.md")
    parser.add_argument("--inputs", type=int, default=32)
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument(
        "--baseline-inputs", type=int, default=0, help="conversations the one-at-a-time baseline times (0: all of them)"
    )
    args = parser.parse_args()

    spec = load_prompt(args.prompt)
    cfg = SynthConfig(
        max_turns=args.turns, agent_max_tokens=args.max_tokens, env_max_tokens=args.max_tokens, agent_resamples=0
    )
    inputs = [
        {"id": i, "input": TASKS[i % len(TASKS)] + ("" if i < len(TASKS) else f" (case {i})")}
        for i in range(args.inputs)
    ]
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    figures: dict[str, Any] = {
        "bench": "synthesis",
        "what": "self role-play",
        "device": device,
        "baseline": "one conversation at a time (the authors' scripts), transformers KV cache",
        "model": args.model,
        "conversations": len(inputs),
        "max_turns": args.turns,
        "max_tokens": args.max_tokens,
    }
    runs: dict[str, tuple[float, int, list[dict]]] = {}

    hf = HFEngine(args.model, batch_size=max(1, args.inputs))
    # Warm-up at the full batch (one short turn): a GPU's first large batch pays for allocator
    # growth and kernel selection, which a small warm-up leaves to the first timed run.
    warm_cfg = SynthConfig(max_turns=1, agent_max_tokens=4, env_max_tokens=4, agent_resamples=0)
    role_play(spec, warm_cfg, hf, inputs)
    hf.prefix_sharing, hf.growing_kv = False, False
    baseline = inputs[: args.baseline_inputs] if args.baseline_inputs else inputs
    figures["baseline_conversations"] = len(baseline)
    runs["one_at_a_time"] = timed_role_play(spec, cfg, hf, baseline, batched=False)
    hf.prefix_sharing, hf.growing_kv = True, True
    kept_bytes, hf.turn_cache.max_bytes = hf.turn_cache.max_bytes, 0  # no kept turns for this row
    before = hf.prefilled_tokens
    runs["hf_whole_history"] = timed_role_play(spec, cfg, hf, inputs, batched=True)
    figures["hf_whole_history_prefilled_tokens"] = hf.prefilled_tokens - before
    hf.turn_cache.max_bytes = kept_bytes
    before = hf.prefilled_tokens
    runs["hf"] = timed_role_play(spec, cfg, hf, inputs, batched=True)
    figures["hf_prefilled_tokens"] = hf.prefilled_tokens - before
    figures["hf_raw_tok_s"] = round(raw_throughput(hf, spec, inputs, args.max_tokens), 1)
    del hf

    python = vllm_python()
    if python is None:
        figures["vllm_skipped"] = "vLLM is not installed: run `make install-vllm`"
    else:
        from genpi import ray_runtime
        from genpi.engines.actors import EnginePool

        ray_runtime.connect(RayConfig(num_cpus=2, dashboard=False))
        # Both cores, as the hf engine above has them (an engine's threads follow its reservation).
        pool = EnginePool(
            ModelConfig(name=args.model, backend="vllm", num_gpus=0, num_cpus=2, batch_size=max(1, args.inputs)),
            "target",
        )
        try:
            role_play(spec, warm_cfg, pool, inputs)  # warm-up
            runs["vllm"] = timed_role_play(spec, cfg, pool, inputs, batched=True)
            figures["vllm_raw_tok_s"] = round(raw_throughput(pool, spec, inputs, args.max_tokens), 1)
        finally:
            pool.shutdown()
            ray_runtime.disconnect()

    def per_conversation(name: str) -> float:
        return runs[name][0] / len(runs[name][2])

    base = per_conversation("one_at_a_time")
    for name, (seconds, tokens, out) in runs.items():
        same = sum(a["turns"] == b["turns"] for a, b in zip(out, runs["hf"][2]))
        figures[f"{name}_s"] = round(seconds, 2)
        figures[f"{name}_tok_s"] = round(tokens / seconds, 1)
        figures[f"{name}_speedup"] = round(base / per_conversation(name), 2)
        line = (
            f"{name:>14}: {seconds:8.2f} s for {len(out)}, {tokens / seconds:6.1f} tok/s "
            f"({base / per_conversation(name):5.2f}x one at a time per conversation; "
            f"{same}/{len(out)} conversations identical to hf)"
        )
        if f"{name}_raw_tok_s" in figures:
            figures[f"{name}_share_of_raw"] = round(tokens / seconds / figures[f"{name}_raw_tok_s"], 2)
            line += f"; {figures[f'{name}_share_of_raw']:.0%} of its raw batched {figures[f'{name}_raw_tok_s']} tok/s"
        print(line)
    best = max((n for n in runs if n != "one_at_a_time"), key=lambda n: base / per_conversation(n))
    figures["best"], figures["best_speedup"] = best, figures[f"{best}_speedup"]
    sample_tokens = runs[best][1] / len(inputs) + 2 * args.max_tokens  # + student and teacher outputs
    minutes = PROJECTED_SAMPLES * sample_tokens / figures[f"{best}_tok_s"] / 60
    figures["projected_1000_samples_target_min"] = round(minutes, 1)
    print(
        f"projected target work for {PROJECTED_SAMPLES} samples ({sample_tokens:.0f} generated tokens each) "
        f"on {device} with {best}: {minutes:.1f} min"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
