"""Training speed and memory: our loop against a plain PEFT + transformers loop (a benchmark).

Both loops train the same LoRA (the config's rank, layers and learning rate) on the same
examples of one prompt, in the same order, for the same number of optimizer steps:

- **ours**: the configured objective through :func:`genpi.train.trainer.step_loss` (logits only
  where a label is predicted, backward per micro-batch);
- **plain**: ``model(input_ids, attention_mask, labels).loss`` per micro-batch, the usual
  transformers recipe (full-vocabulary logits at every position, upcast in the loss).

Each loop runs in its own child process, so each reports its own peak memory (peak RSS on CPU,
``torch.cuda.max_memory_allocated`` on CUDA). Examples come from the prompt's synthesized
records in the store (run ``make run`` first) or from a records file (``--records``); records
that have both an SFT and a Prompt Generation example are used when there are any, since a paper
sample has both. The figure compared is supervised (label) tokens per second.

On CUDA both loops load the base in NF4 with double quantization and step paged AdamW (QLoRA, as
the product trains there); ``--model random-llama-3-8b`` gives the paper's 8B target shape with
random weights, and ``--profile paper`` its settings (batch 32, gradient checkpointing). The bench
then projects one paper-sized run (1,000 samples, 10 epochs) from ours' seconds per record.

    .venv/bin/python bench/train.py [--prompt shell-agent] [--store.url artifacts] [--steps 12]
    python bench/train.py --profile paper --model random-llama-3-8b --records R.jsonl --steps 3  # GPU

The last line is one JSON object with both loops' figures and the ratio.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue as queue_module
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import yaml  # noqa: E402

from genpi import artifacts  # noqa: E402
from genpi.config import load_config  # noqa: E402
from genpi.models import resolve_model  # noqa: E402
from genpi.prompt.files import load_prompts  # noqa: E402
from genpi.store import open_store  # noqa: E402
from genpi.train.batches import collate  # noqa: E402
from genpi.train.examples import RecordExamples, build_examples  # noqa: E402
from genpi.train.loss import label_tokens  # noqa: E402
from genpi.train.objectives import objective_for  # noqa: E402
from genpi.train.trainer import load_for_training, make_optimizer, step_loss  # noqa: E402

PAPER_RUN = {"samples": 1000, "epochs": 10}  # one adapter in the paper (section 6)


def load_examples(args: argparse.Namespace, cfg: Any) -> tuple[list[RecordExamples], str]:
    """The prompt's examples from its synthesized records (the store's, or ``--records``)."""
    from transformers import AutoTokenizer

    spec = next(s for s in load_prompts(args.prompts) if s.name == args.prompt)
    if args.records:
        records, source = (
            [json.loads(line) for line in Path(args.records).read_text().splitlines() if line],
            args.records,
        )
    else:
        store = open_store(args.store)
        key = f"{artifacts.synth_prefix(spec, cfg)}/records.jsonl"
        if not store.exists(key):
            raise SystemExit(
                f"no synthesized records for {spec.name} under {store.location(key)}: run `make run` "
                f"first (same profile), or pass --store.url or --records"
            )
        records, source = store.get_jsonl(key), store.location(key)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.models.target.name))
    examples, _ = build_examples(tokenizer, records, spec, cfg.train.max_seq_len)
    both = [e for e in examples if e.sft is not None and e.pg is not None]
    return both or [e for e in examples if e.any()], source


def plain_step(model: Any, step: list[RecordExamples], micro: int, pad_id: int) -> None:
    """The transformers recipe on the same micro-batches as ours (a micro-batch's SFT examples
    together, its PG examples together), each through ``labels=`` and ``.loss``, token-weighted."""
    total = label_tokens([x for e in step for x in (e.sft, e.pg) if x is not None])
    for start in range(0, len(step), micro):
        records = step[start : start + micro]
        for examples in ([e.sft for e in records if e.sft is not None], [e.pg for e in records if e.pg is not None]):
            if not examples:
                continue
            batch = collate(examples, pad_id, model.device)
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            (out.loss * label_tokens(examples) / total).backward()


def run_loop(kind: str, cfg_dict: dict, steps: list[list[RecordExamples]], queue: Any) -> None:
    from genpi.config import config_from_dict

    cfg = config_from_dict(cfg_dict)
    torch.manual_seed(0)
    model, tokenizer = load_for_training(cfg.train, cfg.models.target.name, cfg.models.target.dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg.train, params, bool(getattr(model, "is_loaded_in_4bit", False)))
    objective = objective_for(cfg.train)
    objective.start(model, tokenizer)
    model.train()
    tokens, records, started = 0, 0, 0.0
    for k, step in enumerate(steps):
        if k == 1:  # the first step warms up allocators and kernels; timing starts after it
            started = time.perf_counter()
        chosen = objective.select(step, k)
        if kind == "ours":
            step_loss(model, chosen, cfg.train, tokenizer.pad_token_id, backward=True, objective=objective)
        else:
            plain_step(model, chosen, cfg.train.micro_batch_size, tokenizer.pad_token_id)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if k >= 1:
            tokens += label_tokens([x for e in chosen for x in (e.sft, e.pg) if x is not None])
            records += len(chosen)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put(
        {
            "tokens_per_s": round(tokens / seconds, 1),
            "supervised_tokens": tokens,
            "records": records,
            "seconds": round(seconds, 2),
            "seconds_per_record": round(seconds / records, 4),
            "peak_mib": round(peak, 1),
            "quantized_nf4": bool(getattr(model, "is_loaded_in_4bit", False)),
            "optimizer": type(optimizer).__name__,
        }
    )


def in_child(kind: str, cfg_dict: dict, steps: list[list[RecordExamples]]) -> dict:
    """One loop's figures, from its own process (its own peak memory); a loop that dies (out of
    memory, say) ends the bench with its exit code instead of a wait for figures that never come."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=run_loop, args=(kind, cfg_dict, steps, queue))
    child.start()
    while True:
        try:
            figures = queue.get(timeout=5)
            child.join()
            return figures
        except queue_module.Empty:
            if not child.is_alive():
                raise SystemExit(f"the {kind} loop died with exit code {child.exitcode}; its error is above") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", default="prompts")
    parser.add_argument("--prompt", default="shell-agent")
    parser.add_argument("--profile", default="local")
    parser.add_argument("--store.url", dest="store", default="artifacts")
    parser.add_argument("--records", default="", help="a synthesized records.jsonl to train on instead of the store's")
    parser.add_argument("--model", default="", help="target model (default: the profile's)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps timed (after one warm-up step)")
    parser.add_argument(
        "--loops",
        default="plain,ours",
        choices=("plain,ours", "ours"),
        help="both loops, or ours alone (its projection only)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config setting, as the job's flags (e.g. train.micro_batch_size=8); repeatable",
    )
    args = parser.parse_args()
    overrides: dict[str, Any] = {"train.pg_fraction": 1.0}  # every step carries PG: the hard case
    for setting in args.set:
        key, _, value = setting.partition("=")
        overrides[key] = yaml.safe_load(value)
    if args.model:
        overrides["models.target.name"] = args.model
    cfg = load_config(args.profile, overrides=overrides)
    examples, source = load_examples(args, cfg)
    b = cfg.train.batch_size
    steps = [[examples[(k * b + i) % len(examples)] for i in range(b)] for k in range(args.steps + 1)]
    results = {}
    for kind in args.loops.split(","):
        results[kind] = in_child(kind, cfg.to_dict(), steps)
        print(f"{kind}: {results[kind]}", flush=True)
    ratio = results["plain"]["tokens_per_s"] / results["ours"]["tokens_per_s"] if len(results) == 2 else None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    paper_minutes = PAPER_RUN["samples"] * PAPER_RUN["epochs"] * results["ours"]["seconds_per_record"] / 60
    print(
        f"projected paper-sized run ({PAPER_RUN['samples']} samples x {PAPER_RUN['epochs']} epochs, each sample "
        f"an SFT and a PG example as here) on {device}: {paper_minutes:.1f} min",
        flush=True,
    )
    print(
        json.dumps(
            {
                "bench": "train",
                "device": device,
                "profile": args.profile,
                "model": cfg.models.target.name,
                "method": cfg.train.method,
                "examples_from": source,
                "records": len(examples),
                "steps": args.steps,
                "batch_size": b,
                "micro_batch_size": cfg.train.micro_batch_size,
                "gradient_checkpointing": cfg.train.gradient_checkpointing,
                "quantization": cfg.train.quantization,
                "ours": results["ours"],
                "plain": results.get("plain"),
                "ours_cost_per_token_vs_plain": ratio and round(ratio, 3),
                "projected_paper_run_min": round(paper_minutes, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
