"""Self Role-Playing synthesis: ours (all conversations batched turn by turn, the prompt's KV
cache shared across the batch) vs the authors' released scripts' way (one conversation at a
time, two generate calls per turn, no sharing), side by side in one run on the same model,
prompt, inputs and settings. Both are greedy, so both produce the same conversations up to
numerics; the bench checks how many agree.

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
from genpi.prompts import load_prompts  # noqa: E402
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

    spec = next(s for s in load_prompts(Path(args.prompt).parent) if s.source.endswith(Path(args.prompt).name))
    cfg = SynthConfig(max_turns=args.turns, agent_max_tokens=args.max_tokens, env_max_tokens=args.max_tokens)
    inputs = [{"id": i, "input": TASKS[i % len(TASKS)] + ("" if i < len(TASKS) else f" (case {i})")}
              for i in range(args.inputs)]
    engine = HFEngine(args.model, batch_size=max(1, args.inputs))
    role_play(spec, cfg, engine, inputs[:1])  # warm-up

    engine.prefix_sharing = False
    start = time.perf_counter()
    baseline = [role_play(spec, cfg, engine, [record])[0] for record in inputs]
    baseline_s = time.perf_counter() - start

    engine.prefix_sharing = True
    start = time.perf_counter()
    ours = role_play(spec, cfg, engine, inputs)
    ours_s = time.perf_counter() - start

    turns = sum(len(c["turns"]) for c in ours)
    same = sum(a["turns"] == b["turns"] for a, b in zip(ours, baseline))
    print(f"one at a time (released scripts): {baseline_s:8.2f} s")
    print(f"batched + shared prompt cache:    {ours_s:8.2f} s")
    print(f"speed-up: {baseline_s / ours_s:.2f}x over {len(inputs)} conversations, {turns} agent turns; "
          f"{same}/{len(inputs)} conversations identical")
    print(json.dumps({"bench": "synthesis", "what": "self role-play", "baseline": "one conversation at a time",
                      "model": args.model, "conversations": len(inputs), "max_turns": args.turns,
                      "baseline_s": round(baseline_s, 2), "ours_s": round(ours_s, 2),
                      "ratio": round(baseline_s / ours_s, 2), "identical": same}))


if __name__ == "__main__":
    main()
