"""Chat tokenization and masking, SFT and Prompt Generation examples and their sizing."""

from __future__ import annotations

import pytest

from genpi.errors import PromptError
from genpi.prompt.files import load_prompts
from genpi.prompt.views import (
    NO_REASON,
    prompt_generation_input,
    prompt_generation_target,
    student_messages,
)
from genpi.train.examples import (
    IGNORE,
    Example,
    ExampleReport,
    build_examples,
    check_pg_fits,
    complete_sentences,
    pg_example,
    sft_example,
    tokenize_chat,
)
from tests.repo import ROOT
from tests.train.tiny import RECORD, SPEC, with_turn

END = "<|im_end|>\n"  # SmolLM2's ChatML end of turn, as labelled


def spans(example: Example) -> list[list[int]]:
    """Runs of labelled tokens."""
    out, cur = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE:
            cur.append(token)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def labelled_text(tokenizer, example: Example) -> str:
    return tokenizer.decode([t for t in example.labels if t != IGNORE])


# ------------------------------------------------------------------ tokenize_chat


def test_tokenize_chat_labels_exactly_the_assistant_turns(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "You run shell commands."},
        {"role": "user", "content": "Count the files in /etc."},
        {"role": "assistant", "content": "Think: list them.\nAct: bash"},
        {"role": "user", "content": "Output: 42"},
        {"role": "assistant", "content": "Think: done.\nAct: answer(42)"},
    ]
    ex = tokenize_chat(tokenizer, messages)
    full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert ex.input_ids == list(full) and len(ex.labels) == len(ex.input_ids)
    assert all(label in (IGNORE, token) for token, label in zip(ex.input_ids, ex.labels))
    assert [tokenizer.decode(s) for s in spans(ex)] == [
        m["content"] + END for m in messages if m["role"] == "assistant"
    ]
    # the masked part is everything else: system, user turns and the assistant headers
    masked = tokenizer.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab == IGNORE])
    assert "You run shell commands." in masked and "Output: 42" in masked and "Act:" not in masked
    assert masked.count("<|im_start|>assistant\n") == 2


def test_tokenize_chat_without_system_turn_masks_the_default_system(tokenizer) -> None:
    ex = tokenize_chat(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    assert [tokenizer.decode(s) for s in spans(ex)] == ["hello" + END]
    assert ex.labels[0] == IGNORE and tokenizer.decode(ex.input_ids).startswith("<|im_start|>system")


# ------------------------------------------------------------------ sft_example / pg_example


def test_sft_example_learns_agent_turns_without_prompt(tokenizer) -> None:
    report = ExampleReport()
    ex = sft_example(tokenizer, RECORD, 4096, report)
    assert ex == tokenize_chat(tokenizer, student_messages(RECORD["input"], RECORD["turns"]))
    assert [tokenizer.decode(s) for s in spans(ex)] == [t["agent"] + END for t in RECORD["turns"]]
    assert SPEC.turns[0].content not in tokenizer.decode(ex.input_ids)
    assert report == ExampleReport()


def test_sft_example_drops_trailing_turns_and_counts(tokenizer) -> None:
    two = tokenize_chat(tokenizer, student_messages(RECORD["input"], RECORD["turns"][:2]))
    report = ExampleReport()
    ex = sft_example(tokenizer, RECORD, len(two.input_ids), report)
    assert ex == two
    assert tokenizer.decode(ex.input_ids).rstrip().endswith(RECORD["turns"][1]["agent"] + "<|im_end|>")
    assert (report.sft_examples_shortened, report.sft_turns_dropped, report.sft_examples_dropped) == (1, 1, 0)

    one = tokenize_chat(tokenizer, student_messages(RECORD["input"], RECORD["turns"][:1]))
    report = ExampleReport()
    assert sft_example(tokenizer, RECORD, len(one.input_ids) - 1, report) is None
    assert (report.sft_examples_shortened, report.sft_turns_dropped, report.sft_examples_dropped) == (0, 0, 1)
    assert sft_example(tokenizer, {**RECORD, "turns": []}, 4096, ExampleReport()) is None


def test_sft_example_never_labels_the_end_of_a_turn_cut_at_the_token_limit(tokenizer) -> None:
    cut_text = "Think: check again.\nAct: bash\n```bash\ncat /etc/hosts | wc"
    record = with_turn(1, agent=cut_text, agent_finish="length")
    report = ExampleReport()
    ex = sft_example(tokenizer, record, 4096, report)
    # The cut turn is learned, but without its end of turn, and the turn after it is left out.
    assert ex.input_ids == tokenize_chat(tokenizer, student_messages(RECORD["input"], record["turns"][:2])).input_ids
    assert [tokenizer.decode(s) for s in spans(ex)] == [RECORD["turns"][0]["agent"] + END, cut_text]
    assert report.sft_cut_turns_open == 1 and report.sft_cut_turns_dropped == 1
    report = ExampleReport()
    first = sft_example(tokenizer, with_turn(0, agent_finish="length"), 4096, report)
    assert [tokenizer.decode(s) for s in spans(first)] == [RECORD["turns"][0]["agent"]]
    assert report.sft_cut_turns_open == 1 and report.sft_cut_turns_dropped == 2


def test_sft_example_never_learns_an_empty_agent_turn(tokenizer) -> None:
    report = ExampleReport()
    ex = sft_example(tokenizer, with_turn(2, agent=" \n"), 4096, report)
    assert ex == tokenize_chat(tokenizer, student_messages(RECORD["input"], RECORD["turns"][:2]))
    assert report.sft_empty_turns_dropped == 1 and report.sft_cut_turns_dropped == 0


def pg_messages(record, spec):
    return [
        {"role": "user", "content": prompt_generation_input(record["input"], record["student"], record["teacher"])},
        {"role": "assistant", "content": prompt_generation_target(spec, record["reason"])},
    ]


def pg_target_len(tokenizer, record, spec) -> int:
    return len(tokenize_chat(tokenizer, pg_messages(record, spec)).input_ids)


@pytest.fixture(scope="module")
def shell_spec():
    return {s.name: s for s in load_prompts(ROOT / "prompts")}["shell-agent"]


def test_pg_example_full_when_it_fits(tokenizer, shell_spec) -> None:
    report = ExampleReport()
    ex = pg_example(tokenizer, RECORD, shell_spec, 8192, report)
    assert labelled_text(tokenizer, ex) == prompt_generation_target(shell_spec, RECORD["reason"]) + END
    seen = tokenizer.decode(ex.input_ids)
    assert RECORD["student"] in seen and RECORD["teacher"] in seen and RECORD["input"] in seen
    assert report == ExampleReport()


def test_pg_example_shortens_the_reason_at_a_sentence_never_the_prompt(tokenizer, shell_spec) -> None:
    full = pg_target_len(tokenizer, RECORD, shell_spec)
    reason_tokens = len(tokenizer.encode(RECORD["reason"], add_special_tokens=False))
    max_len = full - reason_tokens // 3  # fits once a third of the reason is gone
    report = ExampleReport()
    ex = pg_example(tokenizer, RECORD, shell_spec, max_len, report)
    assert ex is not None and len(ex.input_ids) <= max_len
    target = labelled_text(tokenizer, ex)
    head = shell_spec.text() + "\n\n### Why the answer changes\n"
    assert target.startswith(head)  # the whole prompt, uncut, comes first
    kept_reason = target[len(head) : -len(END)]
    assert 0 < len(kept_reason) < len(RECORD["reason"]) and RECORD["reason"].startswith(kept_reason)
    assert kept_reason.endswith("Act lines.")  # whole sentences only
    assert report.pg_reasons_shortened == 1 and report.pg_answers_shortened == 0 and report.pg_examples_dropped == 0
    seen = tokenizer.decode(ex.input_ids)
    assert RECORD["student"] in seen and RECORD["teacher"] in seen  # the answers were not touched


def test_pg_example_dropped_and_reported_when_the_prompt_cannot_fit(tokenizer, shell_spec) -> None:
    prompt_tokens = len(tokenizer.encode(shell_spec.text(), add_special_tokens=False))
    report = ExampleReport()
    assert pg_example(tokenizer, RECORD, shell_spec, prompt_tokens, report) is None
    assert report.pg_examples_dropped == 1 and report.pg_reasons_shortened == 1

    examples, report = build_examples(tokenizer, [RECORD, {**RECORD, "turns": []}], shell_spec, prompt_tokens)
    assert [(e.sft is not None, e.pg is not None) for e in examples] == [(True, False), (False, False)]
    assert (report.sft, report.pg, report.pg_examples_dropped, report.max_len) == (1, 0, 2, prompt_tokens)
    assert report.sft_records_without_turns == 1
    assert report.notes == [
        "1 records have no learnable agent turn (none was kept by the format filter, or the "
        "first was empty) and give no SFT example",
        f"0 SFT and 2 PG examples did not fit in {prompt_tokens} tokens and were left out",
    ]


def test_pg_example_cuts_one_long_answer_enough(tokenizer) -> None:
    record = {**RECORD, "student": "I think that " * 150, "reason": "The prompt asks for actions."}
    full = pg_target_len(tokenizer, record, SPEC)
    max_len = full - 60  # the 450-token student answer can give up 60 tokens easily
    report = ExampleReport()
    ex = pg_example(tokenizer, record, SPEC, max_len, report)
    assert ex is not None and len(ex.input_ids) <= max_len
    assert labelled_text(tokenizer, ex).endswith("The prompt asks for actions." + END)  # the one sentence stays
    assert report.pg_answers_shortened == 1 and report.pg_examples_dropped == 0 and report.pg_reasons_shortened == 0


def test_pg_example_shortens_the_reason_as_far_as_needed(tokenizer, shell_spec) -> None:
    full = pg_target_len(tokenizer, RECORD, shell_spec)
    reason_tokens = len(tokenizer.encode(RECORD["reason"], add_special_tokens=False))
    max_len = full - (reason_tokens * 3) // 4  # fits with a quarter of the reason (answers untouched)
    report = ExampleReport()
    ex = pg_example(tokenizer, RECORD, shell_spec, max_len, report)
    assert ex is not None and len(ex.input_ids) <= max_len
    assert labelled_text(tokenizer, ex).startswith(shell_spec.text())
    assert report.pg_answers_shortened == 0


@pytest.mark.parametrize("field", ["student", "teacher", "reason"])
def test_pg_example_never_built_from_an_empty_answer_or_reason(tokenizer, field: str) -> None:
    report = ExampleReport()
    assert pg_example(tokenizer, {**RECORD, field: "  \n"}, SPEC, 8192, report) is None
    assert report.pg_empty_dropped == 1 and report.pg_examples_dropped == 0


def test_pg_example_absent_where_synthesis_gave_no_reason(tokenizer) -> None:
    report = ExampleReport()
    assert pg_example(tokenizer, {**RECORD, "reason": "", "reason_finish": NO_REASON}, SPEC, 8192, report) is None
    assert report.pg_without_reason == 1 and report.pg_empty_dropped == 0  # by design, not a defect


def test_complete_sentences() -> None:
    assert complete_sentences("One. Two! Three? Four is cut") == "One. Two! Three?"
    assert complete_sentences('He said "stop." Then') == 'He said "stop."'
    assert complete_sentences("Version 3.5 is cut") == ""
    assert complete_sentences("All done.") == "All done."


def test_pg_example_trims_a_cut_reason_to_its_last_full_sentence(tokenizer) -> None:
    cut = {
        **RECORD,
        "reason": "The prompt wants Think lines. It also wants one Act line per re",
        "reason_finish": "length",
    }
    report = ExampleReport()
    ex = pg_example(tokenizer, cut, SPEC, 8192, report)
    assert labelled_text(tokenizer, ex) == prompt_generation_target(SPEC, "The prompt wants Think lines.") + END
    assert report.pg_cut_reasons_trimmed == 1 and report.pg_cut_reasons_open == 0
    report = ExampleReport()
    bare = pg_example(tokenizer, {**cut, "reason": "The prompt wants Think lines and"}, SPEC, 8192, report)
    # no full sentence left: learned as it is, without the end of turn
    assert labelled_text(tokenizer, bare) == prompt_generation_target(SPEC, "The prompt wants Think lines and")
    assert report.pg_cut_reasons_open == 1 and report.pg_cut_reasons_trimmed == 0
    # a reason that ended by itself is kept whole, sentence end or not
    report = ExampleReport()
    whole = pg_example(tokenizer, {**cut, "reason_finish": "stop"}, SPEC, 8192, report)
    assert labelled_text(tokenizer, whole) == prompt_generation_target(SPEC, cut["reason"]) + END


def test_check_pg_fits_names_the_prompt_its_size_and_the_fix(tokenizer, shell_spec) -> None:
    smallest = len(
        tokenize_chat(
            tokenizer, pg_messages({"input": "", "student": "", "teacher": "", "reason": ""}, shell_spec)
        ).input_ids
    )
    assert check_pg_fits(tokenizer, shell_spec, smallest) == smallest
    prompt_tokens = len(tokenizer.encode(shell_spec.text(), add_special_tokens=False))
    with pytest.raises(PromptError) as error:
        check_pg_fits(tokenizer, shell_spec, smallest - 1)
    message = str(error.value)
    assert message.startswith(f"{shell_spec.source}: the prompt is {prompt_tokens:,} tokens")
    assert f"at least {smallest:,} tokens" in message and f"max_len={smallest - 1:,}" in message
    assert "raise train.max_seq_len or use a target model with a longer context" in message
