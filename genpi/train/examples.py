"""Training examples from synthesized records, tokenized with the target's chat template.

- SFT: the student sees the input alone and learns every agent turn of the role-played
  conversation; the input and the environment's observations are masked out. An empty agent
  turn, and every turn after it, is never learned; a turn cut at the token limit is learned
  without its end-of-turn label (the model must not learn to stop mid-action), and the turns
  after it are left out.
- teacher view: the same learnable turns after the prompt (what the teacher sees), labelled on
  those turns only; the ``prepend`` baseline trains on it, ``seqkd-kld`` takes the teacher's
  distributions from it.
- openings: the token ids before the first reply in each view (student, teacher), from which
  ``onpolicy-kl`` samples the adapter's own replies and scores them under the teacher.
- PG (Prompt Generation): the student sees the input, its own answer and the teacher's, and
  learns to write the prompt (as the teacher saw it) followed by the reason. Examples with an
  empty answer or reason are left out; a reason cut at the token limit is trimmed to its last
  full sentence, or, with none, learned without its end-of-turn label.

Nothing is cut silently: sizes come from the model's context, and every shortening (trailing
conversation turns, reasons, answers shown to PG) is counted in the returned report.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from genpi.chat import Conversation, chat_ids
from genpi.errors import PromptError
from genpi.prompt.spec import PromptSpec
from genpi.prompt.views import (
    NO_REASON,
    prompt_generation_input,
    prompt_generation_target,
    student_messages,
    teacher_messages,
)

IGNORE = -100
EXAMPLES_VERSION = 3  # bump when what build_examples produces changes (stored examples are reused)
_SLACK = 4
_SENTENCE_END = re.compile(r"[.!?][\"')\]\u201d\u2019]*(?=\s|$)")


@dataclass
class Example:
    """Token ids and labels (IGNORE where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class RecordExamples:
    """What one record can teach; None where an example could not be built."""

    sft: Example | None  # the student view of the learnable turns
    pg: Example | None
    teacher: Example | None = None  # the teacher view of the same turns
    student_opening: list[int] | None = None  # the input alone, up to the reply's header (on-policy sampling)
    teacher_opening: list[int] | None = None  # the prompt and the input, up to the reply's header

    def any(self) -> bool:
        return self.sft is not None or self.pg is not None


@dataclass
class ExampleReport:
    """How many examples were built, shortened or dropped, and why.

    ``sft_cut_turns_open``: turns cut at the token limit, learned without their end-of-turn label;
    ``sft_cut_turns_dropped``: the turns after them, left out; ``sft_empty_turns_dropped``: turns
    left out from a conversation's first empty agent turn on. ``pg_cut_reasons_trimmed``: reasons
    cut at the token limit, trimmed to their last full sentence (``pg_cut_reasons_open`` when none
    was left: learned without the end-of-turn label). ``pg_without_reason``: records synthesis gave
    no reason (``synth.reason_fraction``), which have no PG example.
    """

    sft: int = 0
    pg: int = 0
    sft_turns_dropped: int = 0
    sft_examples_shortened: int = 0
    sft_examples_dropped: int = 0
    sft_records_without_turns: int = 0
    sft_cut_turns_open: int = 0
    sft_cut_turns_dropped: int = 0
    sft_empty_turns_dropped: int = 0
    pg_empty_dropped: int = 0
    pg_without_reason: int = 0
    pg_cut_reasons_trimmed: int = 0
    pg_cut_reasons_open: int = 0
    pg_reasons_shortened: int = 0
    pg_answers_shortened: int = 0
    pg_examples_dropped: int = 0
    teacher: int = 0
    teacher_turns_dropped: int = 0
    max_len: int = 0
    notes: list[str] = field(default_factory=list)


def tokenize_chat(tokenizer: Any, messages: Conversation, open_end: bool = False, label_from: int = 0) -> Example:
    """Ids of ``messages`` with labels on the assistant turns from message ``label_from`` on
    (their end-of-turn included); nothing else carries a label.

    ``open_end``: the last message was cut at the token limit, so its end-of-turn tokens (from
    the tokenizer's end-of-sequence token on) carry no label.
    """
    ids = chat_ids(tokenizer, messages)
    labels = [IGNORE] * len(ids)
    for k, message in enumerate(messages):
        if message["role"] != "assistant" or k < label_from:
            continue
        start = len(chat_ids(tokenizer, messages[:k], generation_prompt=True))
        through = chat_ids(tokenizer, messages[: k + 1])
        end = len(through)
        if ids[:end] != through:
            raise ValueError(
                "the chat template does not render conversations prefix by prefix; assistant spans cannot be located"
            )
        labels[start:end] = ids[start:end]
        if open_end and k == len(messages) - 1:
            stop = next((p for p in range(start, end) if ids[p] == tokenizer.eos_token_id), end - 1)
            labels[stop:end] = [IGNORE] * (end - stop)
    return Example(ids, labels)


def _shorten(tokenizer: Any, text: str, max_tokens: int) -> str:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[: max(0, max_tokens)])


def complete_sentences(text: str) -> str:
    """``text`` up to its last full sentence (ending with . ! or ?), "" when it has none."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    return text[: ends[-1]] if ends else ""


def learnable_turns(turns: list[dict], report: ExampleReport) -> list[dict]:
    """``turns`` before the first empty agent turn, or through the first cut at the token limit (counted)."""
    for k, turn in enumerate(turns):
        if not turn["agent"].strip():
            report.sft_empty_turns_dropped += len(turns) - k
            return turns[:k]
        if turn.get("agent_finish") == "length":
            report.sft_cut_turns_open += 1
            report.sft_cut_turns_dropped += len(turns) - k - 1
            return turns[: k + 1]
    return list(turns)


def _fitted(build: Callable[[list[dict]], Example], turns: list[dict], max_len: int) -> tuple[Example | None, int]:
    """The example of ``turns``, dropping trailing turns until it fits ``max_len``; and how many were dropped."""
    turns = list(turns)
    dropped = 0
    while turns:
        example = build(turns)
        if len(example.input_ids) <= max_len:
            return example, dropped
        turns.pop()
        dropped += 1
    return None, dropped


def _open(turns: list[dict]) -> bool:
    return turns[-1].get("agent_finish") == "length"


def sft_example(tokenizer: Any, record: dict, max_len: int, report: ExampleReport) -> Example | None:
    """The student-view conversation of the learnable turns; trailing turns that do not fit are
    dropped (counted)."""
    turns = learnable_turns(record["turns"], report)
    if not turns:
        report.sft_records_without_turns += 1
        return None
    example, dropped = _fitted(
        lambda kept: tokenize_chat(tokenizer, student_messages(record["input"], kept), open_end=_open(kept)),
        turns,
        max_len,
    )
    if example is None:
        report.sft_examples_dropped += 1
    elif dropped:
        report.sft_examples_shortened += 1
        report.sft_turns_dropped += dropped
    return example


def teacher_example(
    tokenizer: Any, record: dict, spec: PromptSpec, max_len: int, report: ExampleReport
) -> Example | None:
    """The prompt, then the record's learnable turns, labelled on those turns only; trailing turns
    that do not fit are dropped (counted), None when not even one fits."""
    turns = learnable_turns(record["turns"], ExampleReport())  # counted once, by sft_example
    if not turns:
        return None
    opening = len(teacher_messages(spec, record["input"]))
    example, dropped = _fitted(
        lambda kept: tokenize_chat(
            tokenizer, teacher_messages(spec, record["input"], kept), open_end=_open(kept), label_from=opening
        ),
        turns,
        max_len,
    )
    report.teacher_turns_dropped += dropped
    return example


def _caps(lengths: list[int], remove: int) -> int:
    """The largest cap such that cutting every length down to it removes at least ``remove`` tokens."""
    cap = max(lengths, default=0)
    while cap > 0 and sum(max(0, n - cap) for n in lengths) < remove:
        cap -= 1
    return cap


def _fewer_sentences(tokenizer: Any, reason: str, budget: int) -> str:
    """The longest run of ``reason``'s leading whole sentences within ``budget`` tokens; at least
    its first sentence (the whole reason when it has no sentence end before its last)."""
    ends = [m.end() for m in _SENTENCE_END.finditer(reason)]
    prefixes = [reason[:e] for e in ends if e < len(reason.rstrip())] + [reason]
    fitting = [p for p in prefixes if len(tokenizer.encode(p, add_special_tokens=False)) <= budget]
    return fitting[-1] if fitting else prefixes[0]


def _pg_messages(user_input: str, student: str, teacher: str, spec: PromptSpec, reason: str) -> Conversation:
    return [
        {"role": "user", "content": prompt_generation_input(user_input, student, teacher)},
        {"role": "assistant", "content": prompt_generation_target(spec, reason)},
    ]


def check_pg_fits(tokenizer: Any, spec: PromptSpec, max_len: int) -> int:
    """Tokens of the smallest possible PG example of ``spec`` (empty input, answers and reason);
    raises PromptError when even that exceeds ``max_len``, since no PG example could be trained."""
    n = len(tokenize_chat(tokenizer, _pg_messages("", "", "", spec, "")).input_ids)
    if n > max_len:
        prompt_tokens = len(tokenizer.encode(spec.text(), add_special_tokens=False))
        raise PromptError(
            f"{spec.source}: the prompt is {prompt_tokens:,} tokens and its Prompt Generation examples need at "
            f"least {n:,} tokens, more than the training length max_len={max_len:,}, so the PG loss could "
            "not be trained; raise train.max_seq_len or use a target model with a longer context"
        )
    return n


def pg_example(tokenizer: Any, record: dict, spec: PromptSpec, max_len: int, report: ExampleReport) -> Example | None:
    """Input + both answers → prompt + reason. Never built from an empty answer or reason; a reason
    cut at the token limit keeps its full sentences. The prompt is never cut; to fit, the reason
    loses trailing sentences (down to one), then the longer answer(s) are cut; an example that
    still does not fit is dropped. Every case is counted."""
    student, teacher, reason = record["student"], record["teacher"], record["reason"]
    if record.get("reason_finish") == NO_REASON:
        report.pg_without_reason += 1
        return None
    if not (student.strip() and teacher.strip() and reason.strip()):
        report.pg_empty_dropped += 1
        return None
    open_end = False
    if record.get("reason_finish") == "length":
        if complete_sentences(reason):
            reason = complete_sentences(reason)
            report.pg_cut_reasons_trimmed += 1
        else:
            open_end = True
            report.pg_cut_reasons_open += 1

    def build() -> Example:
        return tokenize_chat(tokenizer, _pg_messages(record["input"], student, teacher, spec, reason), open_end)

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    example = build()
    over = len(example.input_ids) - max_len
    if over > 0:
        # A few tokens of slack: text cut at a token boundary can re-tokenize a little longer.
        shorter = _fewer_sentences(tokenizer, reason, count(reason) - over - _SLACK)
        if shorter != reason:
            reason = shorter
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


def build_examples(
    tokenizer: Any, records: list[dict], spec: PromptSpec, max_len: int
) -> tuple[list[RecordExamples], ExampleReport]:
    """Each record's examples (student-view SFT, PG and teacher view), in order."""
    report = ExampleReport(max_len=max_len)
    examples = [
        RecordExamples(
            sft_example(tokenizer, r, max_len, report),
            pg_example(tokenizer, r, spec, max_len, report),
            teacher_example(tokenizer, r, spec, max_len, report),
            chat_ids(tokenizer, student_messages(r["input"]), generation_prompt=True),
            chat_ids(tokenizer, teacher_messages(spec, r["input"]), generation_prompt=True),
        )
        for r in records
    ]
    report.sft = sum(e.sft is not None for e in examples)
    report.pg = sum(e.pg is not None for e in examples)
    report.teacher = sum(e.teacher is not None for e in examples)
    if report.sft_records_without_turns:
        report.notes.append(
            f"{report.sft_records_without_turns} records have no learnable agent turn (none was "
            f"kept by the format filter, or the first was empty) and give no SFT example"
        )
    if report.pg_empty_dropped:
        report.notes.append(f"{report.pg_empty_dropped} PG examples with an empty answer or reason were left out")
    if report.sft_examples_dropped or report.pg_examples_dropped:
        report.notes.append(
            f"{report.sft_examples_dropped} SFT and {report.pg_examples_dropped} PG examples "
            f"did not fit in {max_len} tokens and were left out"
        )
    return examples, report
