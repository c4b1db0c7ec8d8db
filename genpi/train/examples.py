"""Training examples from synthesized records, tokenized with the target's chat template.

- SFT: the student sees the input alone and learns every agent turn of the role-played
  conversation; the input and the environment's observations are masked out.
- PG (Prompt Generation): the student sees the input, its own answer and the teacher's, and
  learns to write the prompt followed by the reason.

Nothing is cut silently: sizes come from the model's context, and every shortening (trailing
conversation turns, reasons, answers shown to PG) is counted in the returned report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from genpi.engines.base import Conversation
from genpi.synth import templates
from genpi.synth.roleplay import student_messages

IGNORE = -100
_SLACK = 4


@dataclass
class Example:
    """Token ids and labels (IGNORE where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class ExampleReport:
    """How many examples were built, shortened or dropped, and why."""

    sft: int = 0
    pg: int = 0
    sft_turns_dropped: int = 0
    sft_examples_shortened: int = 0
    sft_examples_dropped: int = 0
    sft_records_without_turns: int = 0
    pg_reasons_shortened: int = 0
    pg_answers_shortened: int = 0
    pg_examples_dropped: int = 0
    max_len: int = 0
    notes: list[str] = field(default_factory=list)


def _ids(tokenizer: Any, messages: Conversation, generation_prompt: bool = False) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                              tokenize=True, return_dict=True)["input_ids"])


def tokenize_chat(tokenizer: Any, messages: Conversation) -> Example:
    """Ids of ``messages`` with labels on the assistant turns only (their end-of-turn included)."""
    ids = _ids(tokenizer, messages)
    labels = [IGNORE] * len(ids)
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_ids(tokenizer, messages[:k], generation_prompt=True))
        through = _ids(tokenizer, messages[:k + 1])
        end = len(through)
        if ids[:end] != through:
            raise ValueError("the chat template does not render conversations prefix by prefix; "
                             "assistant spans cannot be located")
        labels[start:end] = ids[start:end]
    return Example(ids, labels)


def _shorten(tokenizer: Any, text: str, max_tokens: int) -> str:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max(0, max_tokens)])


def sft_example(tokenizer: Any, record: dict, max_len: int, report: ExampleReport) -> Example | None:
    """The student-view conversation; trailing turns that do not fit are dropped (counted)."""
    turns = list(record["turns"])
    if not turns:
        report.sft_records_without_turns += 1
        return None
    dropped = 0
    while turns:
        example = tokenize_chat(tokenizer, student_messages(record["input"], turns))
        if len(example.input_ids) <= max_len:
            if dropped:
                report.sft_examples_shortened += 1
                report.sft_turns_dropped += dropped
            return example
        turns.pop()
        dropped += 1
    report.sft_examples_dropped += 1
    return None


def _caps(lengths: list[int], remove: int) -> int:
    """The largest cap such that cutting every length down to it removes at least ``remove`` tokens."""
    cap = max(lengths, default=0)
    while cap > 0 and sum(max(0, n - cap) for n in lengths) < remove:
        cap -= 1
    return cap


def pg_example(tokenizer: Any, record: dict, prompt_text: str, max_len: int, report: ExampleReport) -> Example | None:
    """Input + both answers → prompt + reason. The prompt is never cut; the reason, then the longer
    answer(s), are cut as far as needed; an example that still does not fit is dropped (counted)."""
    student, teacher, reason = record["student"], record["teacher"], record["reason"]

    def build() -> Example:
        return tokenize_chat(tokenizer, [
            {"role": "user", "content": templates.prompt_generation_input(record["input"], student, teacher)},
            {"role": "assistant", "content": templates.prompt_generation_target(prompt_text, reason)}])

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    example = build()
    over = len(example.input_ids) - max_len
    if over > 0:
        # A few tokens of slack: text cut at a token boundary can re-tokenize a little longer.
        reason = _shorten(tokenizer, reason, max(0, count(reason) - over - _SLACK))
        report.pg_reasons_shortened += 1
        example = build()
        over = len(example.input_ids) - max_len
    if over > 0:
        cap = _caps([count(student), count(teacher)], over + _SLACK)
        student, teacher = _shorten(tokenizer, student, cap), _shorten(tokenizer, teacher, cap)
        report.pg_answers_shortened += 1
        example = build()
    if len(example.input_ids) > max_len:
        report.pg_examples_dropped += 1
        return None
    return example


def build_examples(tokenizer: Any, records: list[dict], prompt_text: str,
                   max_len: int) -> tuple[list[tuple[Example | None, Example | None]], ExampleReport]:
    """One (SFT, PG) pair per record, either side None when it could not be built."""
    report = ExampleReport(max_len=max_len)
    pairs = [(sft_example(tokenizer, r, max_len, report), pg_example(tokenizer, r, prompt_text, max_len, report))
             for r in records]
    report.sft = sum(s is not None for s, _ in pairs)
    report.pg = sum(p is not None for _, p in pairs)
    if report.sft_records_without_turns:
        report.notes.append(f"{report.sft_records_without_turns} records have no agent turn (the role play ended "
                            f"before the agent spoke) and give no SFT example")
    if report.sft_examples_dropped or report.pg_examples_dropped:
        report.notes.append(f"{report.sft_examples_dropped} SFT and {report.pg_examples_dropped} PG examples "
                            f"did not fit in {max_len} tokens and were left out")
    return pairs, report
