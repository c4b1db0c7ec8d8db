"""Tiny training fixtures' builders: a small TrainConfig, five records' examples, reference losses."""

from __future__ import annotations

import dataclasses

import torch

from genpi.config import TrainConfig
from genpi.train.examples import (
    IGNORE,
    Example,
    RecordExamples,
    tokenize_chat,
)
from tests.fakes import mini_spec

SPEC = mini_spec()
# LoRA params of the 2-layer tiny Llama per rank: q,o 64+64; k,v 64+32; gate,up 64+128; down 128+64
LORA_PARAMS_PER_RANK = 2 * (128 + 96 + 96 + 128 + 192 + 192 + 192)


def tcfg(**changes) -> TrainConfig:
    base = dict(
        quantization="none",
        gradient_checkpointing=False,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        batch_size=4,
        micro_batch_size=1,
        epochs=1,
        seed=0,
    )
    base.update(changes)
    return dataclasses.replace(TrainConfig(), **base)


def short_pairs(tok) -> list[RecordExamples]:
    """Five records' examples: SFT (student view), PG, the teacher view (a system prompt before the
    same turns, labelled on those turns only) and both views' openings."""

    def chat(*contents, prompt: str = ""):
        roles = ["user", "assistant"] * 3
        messages = [{"role": r, "content": c} for r, c in zip(roles, contents)]
        if prompt:
            return tokenize_chat(tok, [{"role": "system", "content": prompt}] + messages, label_from=1)
        return tokenize_chat(tok, messages)

    prompt = "Reply with Act: lines only, then stop."

    def opening(text, system=""):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        return list(
            tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        )

    def record(turns, pg):
        if turns is None:
            return RecordExamples(None, pg)
        return RecordExamples(
            chat(*turns), pg, chat(*turns, prompt=prompt), opening(turns[0]), opening(turns[0], prompt)
        )

    return [
        record(
            ("count files", "Act: bash ls | wc -l", "Output: 3", "Act: answer(3)"), chat("x? a b", "Prompt: be brief.")
        ),
        record(("show date", "Act: bash date"), None),
        record(
            ("who am i", "Act: bash whoami", "Output: root", "Act: answer(root)"),
            chat("why", "Prompt: use Act lines always, then a reason that is a bit longer."),
        ),
        record(None, chat("q", "Prompt: x")),
        record(("disk free on the root filesystem please", "Act: bash df -h /"), chat("i", "Prompt: tools.")),
    ]


def reference_mean(model, examples: list[Example]) -> torch.Tensor:
    """Mean next-token NLL over every label token of ``examples``, one example at a time."""
    total, count = torch.zeros((), device=model.device), 0
    for ex in examples:
        ids = torch.tensor([ex.input_ids], device=model.device)
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        for pos in range(1, len(ex.input_ids)):
            if ex.labels[pos] != IGNORE:
                total = total - logp[pos - 1, ex.labels[pos]]
                count += 1
    return total / count


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


RECORD = {
    "input": "Count the lines of /etc/hosts",
    "student": "I am a language model and cannot run commands.",
    "teacher": "Think: count.\nAct: bash\n```bash\nwc -l /etc/hosts\n```",
    "reason": " ".join(f"Sentence {i} says the prompt asks for Think and Act lines." for i in range(30)),
    "reason_finish": "stop",
    "turns": [
        {
            "agent": "Think: count.\nAct: bash\n```bash\nwc -l /etc/hosts\n```",
            "observation": "Output: 7",
            "agent_finish": "stop",
        },
        {
            "agent": "Think: check again.\nAct: bash\n```bash\ncat /etc/hosts | wc -l\n```",
            "observation": "Output: 7",
            "agent_finish": "stop",
        },
        {"agent": "Think: it is 7.\nAct: answer(7)", "observation": "", "agent_finish": "stop"},
    ],
}


def with_turn(k: int, **changes) -> dict:
    """RECORD with turn ``k`` changed."""
    turns = [dict(t) for t in RECORD["turns"]]
    turns[k].update(changes)
    return {**RECORD, "turns": turns}
