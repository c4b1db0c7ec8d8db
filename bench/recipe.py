"""Training recipes side by side, judged by measured fidelity (a benchmark, not a test).

Every recipe trains on the same synthesized records of each prompt (synthesis is found in the
store or run once) and is evaluated by the evaluate stage on the same held-out inputs: the
adapter without the prompt against the teacher (with it) and the base model (neither). The
recipes are config overrides on top of a profile; the first is the baseline. Results are
content-addressed like any job's, so a rerun only adds what is new.

    .venv/bin/python bench/recipe.py --prompts prompts/ [--store.url /tmp/genpi-bench] \\
        [--recipe 'name=key:value,key:value' ...] [--eval-inputs DIR]

The last line is one JSON object with each recipe's figures per prompt and its training time.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genpi.batch.graph import synthesize_all  # noqa: E402
from genpi.config import load_config  # noqa: E402
from genpi.engines.environments import resolve_backends  # noqa: E402
from genpi.evaluate.report import batch_rows, batch_table  # noqa: E402
from genpi.evaluate.stage import evaluate_prompt  # noqa: E402
from genpi.prompt.files import load_prompts  # noqa: E402
from genpi.prompt.real_inputs import load_real_inputs  # noqa: E402
from genpi.ray_runtime import connect  # noqa: E402
from genpi.store import store_for  # noqa: E402
from genpi.train.stage import train_prompt  # noqa: E402

RECIPES = {
    # The local profile before the fidelity work: 1 epoch, batch 8, top 15 layers, every PG example.
    "before": {
        "train.epochs": 1,
        "train.batch_size": 8,
        "train.micro_batch_size": 2,
        "train.learning_rate": 3e-4,
        "train.lora_layers": 15,
        "train.pg_fraction": 1.0,
        "train.pg_lambda": 0.3,
    },
    # The shipped local profile.
    "local": {},
}


def parse_recipe(text: str) -> tuple[str, dict[str, str]]:
    name, _, body = text.partition("=")
    return name, dict(item.split(":", 1) for item in body.split(",") if item)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", default="prompts")
    parser.add_argument("--only", action="append", default=[])
    parser.add_argument("--profile", default="local")
    parser.add_argument("--store.url", dest="store", default="/tmp/genpi-bench")
    parser.add_argument("--eval-inputs")
    parser.add_argument("--recipe", action="append", default=[], help="name=key:value,... (default: before, local)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    recipes = dict(parse_recipe(r) for r in args.recipe) if args.recipe else RECIPES
    every = load_prompts(args.prompts)
    real = load_real_inputs(args.eval_inputs, [s.name for s in every]) if args.eval_inputs else {}
    specs = [s for s in every if not args.only or s.name in args.only]
    store = store_for(load_config(args.profile, overrides={"store.url": args.store}).store)
    print(connect(load_config(args.profile).ray))
    figures: dict[str, dict] = {}
    for name, overrides in recipes.items():
        cfg = resolve_backends(load_config(args.profile, overrides={"store.url": args.store, **overrides}))
        failures = synthesize_all(specs, cfg, store, real)  # found in the store when a recipe changes training only
        if failures:
            raise SystemExit(f"synthesis failed: {failures}")
        reports, seconds = [], {}
        for spec in specs:
            started = time.time()
            train_prompt(spec, cfg, store)
            seconds[spec.name] = round(time.time() - started, 1)
            reports.append(evaluate_prompt(spec, cfg, store, real.get(spec.name, [])))
        rows = batch_rows(reports)
        print(f"\n## recipe {name}: {overrides}\n\n{batch_table(rows)}\n")
        figures[name] = {
            "overrides": overrides,
            "train_seconds": seconds,
            "prompts": {
                r["prompt"]: {
                    k: r[k]
                    for k in (
                        "adapter_format",
                        "teacher_format",
                        "base_format",
                        "format_retention",
                        "format_retention_interval",
                        "turn_retention",
                        "sampled_action_retention",
                        "nll_gap_closed",
                        "passed",
                    )
                }
                for r in rows
            },
            "real": {
                r["prompt"]: r["sets"]["real"]["comparison"].get("format_valid") for r in reports if "real" in r["sets"]
            },
        }
    print(json.dumps({"bench": "recipe", "profile": args.profile, "recipes": figures}))


if __name__ == "__main__":
    main()
