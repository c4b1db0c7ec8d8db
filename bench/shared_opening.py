"""A shared opening held once against a copy per row, side by side in one run (hf backend).

The environment persona reads a prompt's worked examples (~1.6k tokens for web shop) before each
episode's own turns; evaluation plays it for every adapter episode on the hf engine. Both engines
here play the same persona episodes (greedy, same batch, the same kept KV between turns); they
differ only in how decode attention reads the opening:

- per_row (the baseline): each row's KV holds its own copy of the opening, read per row;
- once (ours, :mod:`genpi.engines.shared_prefix`): one copy, read once per decode step.

It reports each one's seconds per call and how many replies are the same token for token (bf16
rounds the two attention orders differently; in float32 they agree, which the tests check).

    .venv/bin/python bench/shared_opening.py [--prompt prompts/web-shop-agent.yaml] [--rows 24] [--turns 3]

The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genpi.engines.base import SamplingParams  # noqa: E402
from genpi.engines.hf import HFEngine  # noqa: E402
from genpi.prompt.files import load_prompt  # noqa: E402
from genpi.prompt.views import environment_conversation, environment_opening  # noqa: E402


def play(engine: HFEngine, spec, rows: int, turns: int, max_tokens: int) -> tuple[list[float], list[list[str]]]:
    """Persona episodes: each call answers every row's latest action; returns seconds and replies per call."""
    chats = [
        environment_conversation(spec)
        + [
            {
                "role": "user",
                "content": environment_opening(f"Find item number {k} under ${10 + k}", "Action: search[item]"),
            }
        ]
        for k in range(rows)
    ]
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0, stop=(spec.environment.end_token,))
    seconds, replies = [], []
    for turn in range(turns):
        started = time.time()
        out = engine.generate(chats, params)
        seconds.append(round(time.time() - started, 2))
        replies.append([g.text for g in out])
        for chat, g in zip(chats, out):
            chat += [
                {"role": "assistant", "content": g.text},
                {"role": "user", "content": f"Action: click[item {turn}]"},
            ]
    return seconds, replies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", default="prompts/web-shop-agent.yaml")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    spec = load_prompt(args.prompt)
    figures: dict[str, object] = {"prompt": spec.name, "model": args.model, "rows": args.rows, "turns": args.turns}
    replies = {}
    for mode in ("per_row", "once"):
        engine = HFEngine(args.model, batch_size=args.rows)
        engine._opening_once = engine._opening_once and mode == "once"
        play(engine, spec, 2, 1, 4)  # warm up
        seconds, replies[mode] = play(engine, spec, args.rows, args.turns, args.max_tokens)
        figures[f"{mode}_s_per_call"] = seconds
        figures[f"{mode}_s"] = round(sum(seconds), 2)
        print(f"{mode}: {seconds} s per call", flush=True)
    figures["speedup"] = round(figures["per_row_s"] / figures["once_s"], 2)
    pairs = [(a, b) for call_a, call_b in zip(replies["per_row"], replies["once"]) for a, b in zip(call_a, call_b)]
    figures["same_replies"] = f"{sum(a == b for a, b in pairs)}/{len(pairs)}"
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
