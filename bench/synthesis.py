"""Self Role-Playing synthesis on CPU: ours vs the authors' released scripts' way, side by side
in one run, on the same model, prompt, inputs and settings (greedy, so every variant produces
the same conversations up to numerics; the bench counts how many agree with ours).

- baseline: one conversation at a time, two generate calls per turn (the released scripts),
  transformers' own KV cache;
- batched: every open conversation advances together, one call per persona per turn;
- + shared prefix: the prompt's KV cache computed once per batch, not once per conversation;
- + growing cache (ours): KV cache written in place instead of concatenated every step.

    .venv/bin/python bench/synthesis.py [--model smollm2-135m-instruct] [--inputs 8] [--turns 2]

The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genpi.config import SynthConfig  # noqa: E402
from genpi.engines.hf import HFEngine  # noqa: E402
from genpi.prompts import load_prompt  # noqa: E402
from genpi.synth.roleplay import role_play  # noqa: E402

TASKS = ["Count the regular files under /var/log.", "Which process uses the most memory right now?",
         "Print the kernel version.", "How many users have a login shell of /bin/bash?",
         "Find the largest file in /etc.", "How much free space is left on /?",
         "List the listening TCP ports.", "What time zone is this machine set to?"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompt", default="prompts/shell-agent.md")
    parser.add_argument("--inputs", type=int, default=8)
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()

    spec = load_prompt(args.prompt)
    cfg = SynthConfig(max_turns=args.turns, agent_max_tokens=args.max_tokens, env_max_tokens=args.max_tokens)
    inputs = [{"id": i, "input": TASKS[i % len(TASKS)] + ("" if i < len(TASKS) else f" (case {i})")}
              for i in range(args.inputs)]
    engine = HFEngine(args.model, batch_size=max(1, args.inputs))
    role_play(spec, cfg, engine, inputs[:2])  # warm-up

    def timed(sharing: bool, growing: bool, batched: bool) -> tuple[float, list[dict]]:
        engine.prefix_sharing, engine.growing_kv = sharing, growing
        start = time.perf_counter()
        out = role_play(spec, cfg, engine, inputs) if batched else \
            [role_play(spec, cfg, engine, [record])[0] for record in inputs]
        return time.perf_counter() - start, out

    runs = {
        "baseline": timed(sharing=False, growing=False, batched=False),
        "batched": timed(sharing=False, growing=False, batched=True),
        "shared_prefix": timed(sharing=True, growing=False, batched=True),
        "ours": timed(sharing=True, growing=True, batched=True),
    }
    ours_s, ours = runs["ours"]
    turns = sum(len(c["turns"]) for c in ours)
    figures: dict[str, object] = {"bench": "synthesis", "what": "self role-play on CPU",
                                  "baseline": "one conversation at a time, transformers KV cache",
                                  "model": args.model, "conversations": len(inputs), "max_turns": args.turns,
                                  "agent_turns": turns}
    for name, (seconds, out) in runs.items():
        same = sum(a["turns"] == b["turns"] for a, b in zip(out, ours))
        print(f"{name:>14}: {seconds:8.2f} s  ({runs['baseline'][0] / seconds:5.2f}x the baseline; "
              f"{same}/{len(inputs)} conversations identical to ours)")
        figures[f"{name}_s"] = round(seconds, 2)
    figures["ratio"] = round(runs["baseline"][0] / ours_s, 2)
    figures["ratio_over_batched"] = round(runs["batched"][0] / ours_s, 2)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
