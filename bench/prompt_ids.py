"""Recall of the prompt's identifiers: can an adapter, without the prompt, write the ids that the
teacher copies from it (a benchmark, not a test)?

The identifiers are the teacher's words that mix letters and digits (product ids, emails, paths:
six characters or more), that its prompt holds and the input does not, in its first reply to each
test input of a ``make run`` (the references). Each is scored teacher-forced under each training
run's adapter, without the prompt: the mean probability of its tokens, and whether greedy decoding
writes every one of them (exact recall).

    .venv/bin/python bench/prompt_ids.py --only web-shop-agent [--prompts prompts] [--store artifacts] [--run HASH ...]

Without ``--run``, every training run of the prompt in the store. The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genpi import artifacts  # noqa: E402
from genpi.chat import chat_ids  # noqa: E402
from genpi.engines.hf import load_model_and_tokenizer  # noqa: E402
from genpi.evaluate.teacher_forced import reply_ids  # noqa: E402
from genpi.models import EMBEDDED  # noqa: E402
from genpi.prompt.files import load_prompts  # noqa: E402
from genpi.prompt.views import student_messages  # noqa: E402

_WORD = re.compile(r"[A-Za-z0-9_@./-]{6,}")


def prompt_ids(reply: str, prompt: str, user_input: str) -> list[str]:
    """The reply's identifiers (letters and digits mixed) found in ``prompt`` and not in ``user_input``."""
    return [
        w
        for w in dict.fromkeys(_WORD.findall(reply))
        if re.search(r"\d", w) and re.search(r"[A-Za-z]", w) and w in prompt and w not in user_input
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default="prompts", help="the folder of prompt files")
    parser.add_argument("--only", required=True, help="the prompt's name")
    parser.add_argument("--store", default="artifacts", help="a local store holding a make run of the prompt")
    parser.add_argument("--run", action="append", default=[], help="a training run's hash (default: every one)")
    args = parser.parse_args()
    spec = next(s for s in load_prompts(args.prompts) if s.name == args.only)
    root = Path(args.store) / artifacts.prompt_root(spec)
    prompt = spec.text()
    references = sorted(root.glob("references/*/test-teacher.jsonl"))
    if not references:
        raise SystemExit(f"no test references of {spec.name} in {root}: run `make run` first")
    cases = []
    for line in references[0].read_text().splitlines():
        episode = json.loads(line)
        reply = episode["turns"][0]["agent"] if episode["turns"] else ""
        if prompt_ids(reply, prompt, episode["input"]):
            cases.append((episode["input"], reply))
    runs = args.run or sorted(p.name for p in (root / "train").iterdir() if (p / "adapter").is_dir())
    base, tokenizer = load_model_and_tokenizer(EMBEDDED, dtype="bfloat16", device="cpu")
    from peft import PeftModel

    figures: dict[str, dict] = {}
    for run in runs:
        model = PeftModel.from_pretrained(base, str(root / "train" / run / "adapter"), adapter_name=run).eval()
        probs, exact, words = [], 0, 0
        for user_input, reply in cases:
            context = student_messages(user_input)
            ids = chat_ids(tokenizer, context, generation_prompt=True)
            target = reply_ids(tokenizer, context, reply)
            with torch.no_grad():
                logits = model(torch.tensor([ids + target])).logits[0, len(ids) - 1 : -1].float()
            p = logits.softmax(-1).gather(1, torch.tensor(target)[:, None])[:, 0]
            greedy = logits.argmax(-1).tolist()
            for word in prompt_ids(reply, prompt, user_input):
                start = len(tokenizer.encode(reply[: reply.index(word)], add_special_tokens=False))
                span = range(start, start + len(tokenizer.encode(word, add_special_tokens=False)))
                probs += [float(p[k]) for k in span]
                exact += all(greedy[k] == target[k] for k in span)
                words += 1
        summary = json.loads((root / "train" / run / "summary.json").read_text())["train"]
        setting = {k: summary[k] for k in ("learning_rate", "min_steps", "batch_size")}
        setting["loraplus_lr_ratio"] = summary.get("loraplus_lr_ratio", 1.0)  # runs stored before LoRA+: 1
        figures[run] = {
            **setting,
            "ids": words,
            "mean_token_p": round(sum(probs) / max(1, len(probs)), 3),
            "exact": exact,
        }
        print(
            f"{run} {setting}: {words} identifiers in {len(cases)} replies, mean token p {figures[run]['mean_token_p']}, exact {exact}"
        )
        base = model.unload()
    print(json.dumps({"bench": "prompt_ids", "prompt": spec.name, "replies": len(cases), "runs": figures}))


if __name__ == "__main__":
    main()
