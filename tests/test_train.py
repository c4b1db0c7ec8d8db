"""Training on the tiny random model: chat tokenization and masking, example sizing, the joint
loss and its micro-batch invariance, the learning-rate schedule, adapter training and the
resumable training stage."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from genpi import artifacts
from genpi.config import TrainConfig, load_config
from genpi.prompt.views import NO_REASON, prompt_generation_input, prompt_generation_target, student_messages
from genpi.models import TINY, resolve_model
from genpi.errors import ArtifactNotFound, GenPIError, PromptError
from genpi.prompt.files import load_prompts
from genpi.prompt.splits import assign_splits
from genpi.store import LocalStore
from genpi.synth.stage import synthesize
from genpi.train import stage as train_stage
from genpi.train.batches import collate
from genpi.train.examples import (
    IGNORE,
    Example,
    ExampleReport,
    RecordExamples,
    build_examples,
    check_pg_fits,
    complete_sentences,
    pg_example,
    sft_example,
    tokenize_chat,
)
from genpi.train.trainer import load_for_training, lr_factor, step_loss, train_adapter
from tests.fakes import FakeEngine, World, mini_spec

ROOT = Path(__file__).resolve().parents[1]
END = "<|im_end|>\n"  # SmolLM2's ChatML end of turn, as labelled
SPEC = mini_spec()
# LoRA params of the 2-layer tiny Llama per rank: q,o 64+64; k,v 64+32; gate,up 64+128; down 128+64
LORA_PARAMS_PER_RANK = 2 * (128 + 96 + 96 + 128 + 192 + 192 + 192)


def tcfg(**changes) -> TrainConfig:
    base = dict(quantization="none", gradient_checkpointing=False, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                batch_size=4, micro_batch_size=1, epochs=1, seed=0)
    base.update(changes)
    return dataclasses.replace(TrainConfig(), **base)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(TINY))


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
    messages = [{"role": "system", "content": "You run shell commands."},
                {"role": "user", "content": "Count the files in /etc."},
                {"role": "assistant", "content": "Think: list them.\nAct: bash"},
                {"role": "user", "content": "Output: 42"},
                {"role": "assistant", "content": "Think: done.\nAct: answer(42)"}]
    ex = tokenize_chat(tokenizer, messages)
    full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert ex.input_ids == list(full) and len(ex.labels) == len(ex.input_ids)
    assert all(label in (IGNORE, token) for token, label in zip(ex.input_ids, ex.labels))
    assert [tokenizer.decode(s) for s in spans(ex)] == [m["content"] + END for m in messages if m["role"] == "assistant"]
    # the masked part is everything else: system, user turns and the assistant headers
    masked = tokenizer.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab == IGNORE])
    assert "You run shell commands." in masked and "Output: 42" in masked and "Act:" not in masked
    assert masked.count("<|im_start|>assistant\n") == 2


def test_tokenize_chat_without_system_turn_masks_the_default_system(tokenizer) -> None:
    ex = tokenize_chat(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    assert [tokenizer.decode(s) for s in spans(ex)] == ["hello" + END]
    assert ex.labels[0] == IGNORE and tokenizer.decode(ex.input_ids).startswith("<|im_start|>system")


# ------------------------------------------------------------------ sft_example / pg_example

RECORD = {
    "input": "Count the lines of /etc/hosts",
    "student": "I am a language model and cannot run commands.",
    "teacher": "Think: count.\nAct: bash\n```bash\nwc -l /etc/hosts\n```",
    "reason": " ".join(f"Sentence {i} says the prompt asks for Think and Act lines." for i in range(30)),
    "reason_finish": "stop",
    "turns": [{"agent": "Think: count.\nAct: bash\n```bash\nwc -l /etc/hosts\n```", "observation": "Output: 7",
               "agent_finish": "stop"},
              {"agent": "Think: check again.\nAct: bash\n```bash\ncat /etc/hosts | wc -l\n```",
               "observation": "Output: 7", "agent_finish": "stop"},
              {"agent": "Think: it is 7.\nAct: answer(7)", "observation": "", "agent_finish": "stop"}],
}


def with_turn(k: int, **changes) -> dict:
    """RECORD with turn ``k`` changed."""
    turns = [dict(t) for t in RECORD["turns"]]
    turns[k].update(changes)
    return {**RECORD, "turns": turns}


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
    return [{"role": "user", "content": prompt_generation_input(record["input"], record["student"], record["teacher"])},
            {"role": "assistant", "content": prompt_generation_target(spec, record["reason"])}]


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
    kept_reason = target[len(head):-len(END)]
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
    assert report.notes == ["1 records have no learnable agent turn (none was kept by the format filter, or the "
                            "first was empty) and give no SFT example",
                            f"0 SFT and 2 PG examples did not fit in {prompt_tokens} tokens and were left out"]


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
    cut = {**RECORD, "reason": "The prompt wants Think lines. It also wants one Act line per re", "reason_finish": "length"}
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
    smallest = len(tokenize_chat(tokenizer, pg_messages({"input": "", "student": "", "teacher": "", "reason": ""},
                                                        shell_spec)).input_ids)
    assert check_pg_fits(tokenizer, shell_spec, smallest) == smallest
    prompt_tokens = len(tokenizer.encode(shell_spec.text(), add_special_tokens=False))
    with pytest.raises(PromptError) as error:
        check_pg_fits(tokenizer, shell_spec, smallest - 1)
    message = str(error.value)
    assert message.startswith(f"{shell_spec.source}: the prompt is {prompt_tokens:,} tokens")
    assert f"at least {smallest:,} tokens" in message and f"max_len={smallest - 1:,}" in message
    assert "raise train.max_seq_len or use a target model with a longer context" in message


# ------------------------------------------------------------------ the joint loss

@pytest.fixture(scope="module")
def lora_model():
    """Tiny model in float32 with a seeded LoRA whose B matrices are made non-zero (so LoRA matters)."""
    torch.set_num_threads(2)
    model, tok = load_for_training(tcfg(), TINY, "float32")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.eval()
    return model, tok


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
        return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"])

    def record(turns, pg):
        if turns is None:
            return RecordExamples(None, pg)
        return RecordExamples(chat(*turns), pg, chat(*turns, prompt=prompt), opening(turns[0]),
                              opening(turns[0], prompt))

    return [
        record(("count files", "Act: bash ls | wc -l", "Output: 3", "Act: answer(3)"), chat("x? a b", "Prompt: be brief.")),
        record(("show date", "Act: bash date"), None),
        record(("who am i", "Act: bash whoami", "Output: root", "Act: answer(root)"),
               chat("why", "Prompt: use Act lines always, then a reason that is a bit longer.")),
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


@pytest.mark.timeout(120)
def test_step_loss_is_independent_of_micro_batch_size(lora_model) -> None:
    model, tok = lora_model
    pairs = short_pairs(tok)
    results = {}
    for mb in (1, 2, 4):
        model.zero_grad(set_to_none=True)
        losses = step_loss(model, pairs, tcfg(micro_batch_size=mb, pg_lambda=0.3), tok.pad_token_id, backward=True)
        results[mb] = (losses, grads(model))
    base_losses, base_grads = results[1]
    assert all(g.abs().sum() > 0 for g in base_grads.values())  # every LoRA matrix gets a gradient
    for mb in (2, 4):
        losses, g = results[mb]
        for key in ("loss", "sft_loss", "pg_loss"):
            assert losses[key] == pytest.approx(base_losses[key], rel=1e-5), (mb, key)
        for name in base_grads:
            torch.testing.assert_close(g[name], base_grads[name], rtol=1e-4, atol=1e-6, msg=f"{mb} {name}")
    assert base_losses["loss"] == pytest.approx(0.7 * base_losses["sft_loss"] + 0.3 * base_losses["pg_loss"], rel=1e-6)
    model.zero_grad(set_to_none=True)


@pytest.mark.timeout(120)
def test_step_loss_terms_are_token_means(lora_model) -> None:
    model, tok = lora_model
    pairs = short_pairs(tok)
    with torch.no_grad():
        sft_ref = reference_mean(model, [e.sft for e in pairs if e.sft is not None]).item()
        pg_ref = reference_mean(model, [e.pg for e in pairs if e.pg is not None]).item()
        only_sft = step_loss(model, pairs, tcfg(pg_lambda=0.0, micro_batch_size=2), tok.pad_token_id, backward=False)
        only_pg = step_loss(model, pairs, tcfg(pg_lambda=1.0, micro_batch_size=4), tok.pad_token_id, backward=False)
    assert sft_ref != pytest.approx(pg_ref, rel=1e-3)  # the two terms really differ
    assert only_sft["loss"] == pytest.approx(sft_ref, rel=1e-5)
    assert only_sft["sft_loss"] == pytest.approx(sft_ref, rel=1e-5)
    assert only_pg["loss"] == pytest.approx(pg_ref, rel=1e-5)
    assert only_pg["pg_loss"] == pytest.approx(pg_ref, rel=1e-5)


@pytest.mark.timeout(60)
def test_step_loss_skips_pairs_without_examples(lora_model) -> None:
    model, tok = lora_model
    pairs = short_pairs(tok)[:2]
    model.zero_grad(set_to_none=True)
    alone = step_loss(model, pairs, tcfg(micro_batch_size=1), tok.pad_token_id, backward=True)
    model.zero_grad(set_to_none=True)
    with_empty = step_loss(model, pairs + [RecordExamples(None, None)], tcfg(micro_batch_size=1), tok.pad_token_id, backward=True)
    model.zero_grad(set_to_none=True)
    assert with_empty["loss"] == pytest.approx(alone["loss"], rel=1e-6)


def test_collate_pads_right_without_loss_or_attention(tokenizer) -> None:
    a, b = Example([5, 6, 7], [IGNORE, 6, 7]), Example([8], [IGNORE])
    batch = collate([a, b], pad_id=2, device="cpu")
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


# ------------------------------------------------------------------ learning rate

def test_lr_factor_warmup_then_cosine() -> None:
    cfg = tcfg(warmup_ratio=0.1, lr_scheduler="cosine")
    total = 100
    f = [lr_factor(cfg, s, total) for s in range(total)]
    assert f[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert f[9] == 1.0 and f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # never increases after warmup
    assert f[55] == pytest.approx(0.5, abs=0.02)
    assert f[-1] < 1e-3 and f[-1] >= 0
    assert lr_factor(cfg, total, total) == pytest.approx(0.0, abs=1e-12)


def test_lr_factor_constant_and_linear() -> None:
    const = tcfg(warmup_ratio=0.0, lr_scheduler="constant")
    assert [lr_factor(const, s, 20) for s in range(20)] == [1.0] * 20
    linear = tcfg(warmup_ratio=0.0, lr_scheduler="linear")
    assert [lr_factor(linear, s, 4) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert lr_factor(tcfg(warmup_ratio=0.03), 0, 1) == 1.0  # one step: warmup ends at the peak


# ------------------------------------------------------------------ train_adapter

@pytest.mark.timeout(180)
def test_train_adapter_writes_a_loadable_lora_adapter(tokenizer, tmp_path: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    pairs = short_pairs(tokenizer)
    cfg = tcfg(batch_size=2, micro_batch_size=1, learning_rate=1e-2, warmup_ratio=0.0, lora_r=2, lora_alpha=4)
    lines: list[str] = []
    metrics = train_adapter(cfg, TINY, "float32", pairs[:3], pairs[3:], tmp_path / "adapter", log=lines.append)
    assert metrics["steps"] == 2 == len(metrics["history"])  # ceil(3 / 2) steps, 1 epoch
    assert metrics["epochs"] == 1 and metrics["quantized_nf4"] is False
    assert metrics["trainable_params"] == LORA_PARAMS_PER_RANK * 2  # LoRA on every linear but the LM head
    assert metrics["total_params"] > 100 * metrics["trainable_params"]
    assert "val_loss" in metrics["final"] and math.isfinite(metrics["final"]["loss"])
    assert [h["lr"] for h in metrics["history"]] == pytest.approx([1e-2, 1e-2 * 0.5 * (1 + math.cos(math.pi / 2))])
    assert len(lines) == 3 and lines[0].startswith("step 1/2 epoch 1 loss")

    # min_steps adds passes, the last one partial: 3 records in steps of 2 make 2 steps a pass
    longer = train_adapter(dataclasses.replace(cfg, min_steps=5), TINY, "float32", pairs[:3], pairs[3:],
                           tmp_path / "longer", log=lambda line: None)
    assert longer["steps"] == 5 == len(longer["history"]) and longer["epochs"] == 3
    assert [h["epoch"] for h in longer["history"]] == [0, 0, 1, 1, 2]
    assert "val_loss" in longer["final"]  # after the last (partial) pass

    out = tmp_path / "adapter"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and all("lora_A" in k or "lora_B" in k for k in weights)
    assert not any("lm_head" in k for k in weights)
    assert sum(w.numel() for w in weights.values()) == metrics["trainable_params"]
    assert any(k.endswith("lora_B.weight") and w.abs().sum() > 0 for k, w in weights.items())  # it trained
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 4

    base = AutoModelForCausalLM.from_pretrained(resolve_model(TINY), dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(out))
    state = loaded.state_dict()
    for key, value in weights.items():
        match = [k for k in state if k.replace(".default", "") == key]
        assert len(match) == 1, key
        torch.testing.assert_close(state[match[0]], value)


@pytest.mark.timeout(60)
def test_only_lora_parameters_are_trainable() -> None:
    model, _ = load_for_training(tcfg(lora_r=3), TINY, "float32")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2  # 2 layers x 7 linears x (A, B)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == LORA_PARAMS_PER_RANK * 3


def test_lora_layers_puts_adapters_on_the_top_layers_only() -> None:
    model, _ = load_for_training(tcfg(lora_r=3, lora_layers=1), TINY, "float32")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 7 * 2 and all(".layers.1." in n for n in trainable)  # 7 linears x (A, B)
    every = load_for_training(tcfg(lora_r=3, lora_layers=5), TINY, "float32")[0]  # more than the model has
    assert sum(p.requires_grad for p in every.parameters()) == 2 * 7 * 2


# ------------------------------------------------------------------ the training stage

@pytest.mark.timeout(240)
def test_train_prompt_from_a_synthesized_store(tmp_path: Path, monkeypatch, tokenizer) -> None:
    store = LocalStore(tmp_path)
    cfg = load_config("local", overrides={
        "synth.num_inputs": 5, "synth.min_inputs": 4, "synth.part_size": 8, "synth.max_turns": 2,
        "synth.reason_fraction": 1.0, "train.min_steps": 0, "split.val_fraction": 0.2, "split.test_fraction": 0.2,
        "models.target.name": TINY,
        "models.generator.name": TINY,
        "models.target.dtype": "float32", "train.epochs": 1, "train.batch_size": 2, "train.micro_batch_size": 2,
        "train.lora_r": 2, "train.pg_lambda": 0.4, "train.quantization": "none", "train.threads": 2})
    world = World(SPEC)
    synthesize(SPEC, cfg, FakeEngine(world), FakeEngine(world), store)
    seen: dict[str, list] = {}
    real_train_adapter = train_stage.train_adapter

    def spy(train_cfg, model, dtype, train, val, out, log, checkpoints):
        seen.update(train=train, val=val, checkpoints=checkpoints)
        return real_train_adapter(train_cfg, model, dtype, train, val, out, log, checkpoints)

    monkeypatch.setattr(train_stage, "train_adapter", spy)
    prefix = train_stage.train_prompt(SPEC, cfg, store)
    assert prefix == artifacts.train_prefix(SPEC, cfg)
    keys = store.list_keys(prefix)
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/genpi.json",
                 "metrics.json", "summary.json", "_SUCCESS"):
        assert f"{prefix}/{name}" in keys, name
    provenance = store.get_json(f"{prefix}/adapter/genpi.json")
    assert provenance["prompt_hash"] == SPEC.prompt_hash and provenance["prompt_id"] == SPEC.id
    assert provenance["run_hash"] == artifacts.run_hash(cfg) and provenance["synth_hash"] == artifacts.synth_hash(cfg)
    assert provenance["pg_lambda"] == 0.4 and provenance["base_model"] == TINY
    metrics = store.get_json(f"{prefix}/metrics.json")
    examples = metrics["examples"]
    assert (examples["sft"], examples["pg"], examples["max_len"]) == (4, 4, 2048)  # the test record is left out
    assert examples["sft_examples_dropped"] == 0 and examples["pg_examples_dropped"] == 0
    assert metrics["steps"] == 2  # 3 training records, batch 2, 1 epoch
    summary = store.get_json(f"{prefix}/summary.json")
    assert summary["records"] == {"train": 3, "val": 1, "test": 1} and summary["run_hash"] == artifacts.run_hash(cfg)
    # trained on exactly the "train" records and validated on the "val" ones, never on "test"
    records = store.get_jsonl(f"{artifacts.synth_prefix(SPEC, cfg)}/records.jsonl")
    split = assign_splits([r["id"] for r in records], 0.2, 0.2, cfg.split.seed)
    for name in ("train", "val"):
        expected, _ = build_examples(tokenizer, [r for r in records if split[r["id"]] == name], SPEC, 2048)
        assert seen[name] == expected, name
    assert summary["adapter"] == store.location(f"{prefix}/adapter")
    assert store.done_info(prefix)["run_hash"] == artifacts.run_hash(cfg)
    assert seen["checkpoints"].prefix == f"{prefix}/checkpoints"  # checkpointed each epoch in the store,
    assert not store.list_keys(f"{prefix}/checkpoints")  # and dropped once the run was done

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run must not train again")

    monkeypatch.setattr(train_stage, "train_adapter", no_training)
    assert train_stage.train_prompt(SPEC, cfg, store) == prefix
    # a different lambda is a different run and would train
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, pg_lambda=0.5))
    with pytest.raises(AssertionError, match="must not train again"):
        train_stage.train_prompt(SPEC, other, store)


def test_train_prompt_fails_before_training_when_pg_cannot_fit(tmp_path: Path, monkeypatch) -> None:
    cfg = load_config("local", overrides={"models.target.name": TINY, "models.generator.name": TINY,
                                          "train.max_seq_len": 64, "train.threads": 2})
    monkeypatch.setattr(train_stage, "train_adapter", lambda *a, **k: pytest.fail("must fail before training"))
    empty = LocalStore(tmp_path)  # the check comes before the records are even read
    with pytest.raises(PromptError, match=r"prompts/mini-shell\.md: the prompt is [\d,]+ tokens .* "
                                          r"max_len=64, .* raise train\.max_seq_len"):
        train_stage.train_prompt(SPEC, cfg, empty)
    # with lambda 0 no PG example is trained, so the check does not apply: the stage goes on to the records
    sft_only = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, pg_lambda=0.0))
    with pytest.raises(ArtifactNotFound):
        train_stage.train_prompt(SPEC, sft_only, empty)


def test_train_prompt_names_why_no_example_could_be_built(tmp_path: Path) -> None:
    cfg = load_config("local", overrides={"models.target.name": TINY, "models.generator.name": TINY,
                                          "train.threads": 2})
    store = LocalStore(tmp_path)
    cut = with_turn(0, agent=" ")
    store.put_jsonl(f"{artifacts.synth_prefix(SPEC, cfg)}/records.jsonl",
                    [{**cut, "id": i, "student": ""} for i in range(4)])
    with pytest.raises(GenPIError, match=r"prompts/mini-shell\.md: no training example could be built within "
                                         r"2048 tokens .*records have no learnable agent turn.* PG examples with an "
                                         r"empty answer or reason"):
        train_stage.train_prompt(SPEC, cfg, store)


def test_pg_fraction_spreads_the_kept_pg_examples_evenly() -> None:
    from genpi.train.objectives.genpi import pg_kept, with_pg_fraction

    assert [pg_kept(1.0, s, 4) for s in range(5)] == [4] * 5  # the paper: every PG example
    assert [pg_kept(0.0, s, 4) for s in range(5)] == [0] * 5
    kept = [pg_kept(0.1, s, 4) for s in range(50)]
    assert sum(kept) == 20 and max(kept) == 1 and kept[:5] == [0, 0, 1, 0, 1]
    R = RecordExamples
    pairs = [R("s1", "p1"), R("s2", "p2"), R(None, "p3")]
    assert with_pg_fraction(pairs, 1) == [R("s1", "p1"), R("s2", None), R(None, None)]
    assert with_pg_fraction([R("s0", None)] + pairs, 1)[:2] == [R("s0", None), R("s1", "p1")]  # quota spent on real PG
    assert with_pg_fraction(pairs, 4) == pairs
