"""The engine's adapter paths side by side: merged, one adapter unmerged, an adapter per row, PEFT (a benchmark).

One process, the embedded model in bf16, the adapters a ``make run`` published (the first one
repeated when fewer than four). Each path decodes the same batch (``--batch`` rows of random
token ids, ``--tokens`` new tokens each, greedy, no early stop), best of ``--repeats`` rounds (the paths interleaved in each); figures
are decode seconds and ratios to the base model alone:

- ``merged``: the adapter merged into a copy of the weights (what a server does for a batch of
  one adapter, ``serve.merged_adapters``);
- ``one``: one adapter's factors applied beside the weights (what the job's engines do);
- ``rows``: four adapters, a quarter of the rows each, one forward (a server's mixed batch);
- ``peft_one``, ``peft_rows``: the same through PEFT (``PeftModel``; ``adapter_names`` per row).

    .venv/bin/python bench/adapters.py --store artifacts

The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genpi.engines.hf import load_model_and_tokenizer  # noqa: E402
from genpi.engines.lora_bank import LoraBank  # noqa: E402
from genpi.models import EMBEDDED  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="artifacts", help="a local store with published adapters")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--context", type=int, default=160, help="tokens per row before decoding")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: the machine's cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    folders = sorted(p.parent for p in Path(args.store).glob("adapters/*/*/adapter_config.json"))
    if not folders:
        sys.exit(f"bench/adapters.py: no published adapters under {args.store}/adapters; run `make run` first")
    folders = (folders * 4)[:4]
    model, _ = load_model_and_tokenizer(EMBEDDED, "bfloat16", "cpu")
    torch.manual_seed(0)
    ids = torch.randint(100, 20000, (args.batch, args.context))
    names = [f"a{k}" for k in range(4)]
    rows = [names[r * 4 // args.batch] for r in range(args.batch)]

    def decode(m, **extra) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            m.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.tokens,
                min_new_tokens=args.tokens,
                do_sample=False,
                pad_token_id=0,
                **extra,
            )
        return time.perf_counter() - start

    bank = LoraBank(model, max_merged=1)
    for name, folder in zip(names, folders):
        bank.add(name, folder)
    from peft import PeftModel

    fresh, _ = load_model_and_tokenizer(EMBEDDED, "bfloat16", "cpu")  # the bank's wrappers are not PEFT's
    peft = PeftModel.from_pretrained(fresh, str(folders[0]), adapter_name="a0").eval()
    for name, folder in zip(names[1:], folders[1:]):
        peft.load_adapter(str(folder), adapter_name=name)
    peft.set_adapter("a0")
    paths = {
        "base": lambda: bank.use(None),
        "merged": lambda: bank.use("a0", merge=True),
        "one": lambda: bank.use("a0"),
        "rows": lambda: bank.use_rows(rows),
    }
    seconds = dict.fromkeys([*paths, "peft_one", "peft_rows"], float("inf"))
    decode(model)  # warm-up
    for _ in range(args.repeats):  # paths interleaved, best of the rounds: load on the machine hits them alike
        for path, scope in paths.items():
            with scope():
                seconds[path] = min(seconds[path], decode(model))
        seconds["peft_one"] = min(seconds["peft_one"], decode(peft))
        seconds["peft_rows"] = min(seconds["peft_rows"], decode(peft, adapter_names=rows))
        print({k: round(v, 3) for k, v in seconds.items()}, file=sys.stderr, flush=True)
    base = seconds["base"]
    figures = {f"{k}_vs_base": round(v / base, 3) for k, v in seconds.items() if k != "base"}
    figures["rows_vs_merged"] = round(seconds["rows"] / seconds["merged"], 3)
    figures["rows_vs_peft_rows"] = round(seconds["rows"] / seconds["peft_rows"], 3)
    figures.update(
        batch=args.batch,
        tokens=args.tokens,
        context=args.context,
        threads=torch.get_num_threads(),
        base_s=round(base, 3),
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
