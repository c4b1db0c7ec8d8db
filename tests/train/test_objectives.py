"""Invariants of the training objectives on the tiny model: configurations that must give the
same loss and gradients, the KL of a model with itself, and each objective's own terms."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from genpi.config import TrainConfig
from genpi.models import TINY
from genpi.train.batches import collate
from genpi.train.examples import (
    IGNORE,
    Example,
    RecordExamples,
    teacher_example,
    tokenize_chat,
)
from genpi.train.loss import label_logits, summed_kl
from genpi.train.objectives import OBJECTIVES, objective_for
from genpi.train.objectives.prepend import prepended
from genpi.train.teacher_prefix import TeacherPrefix, shared_opening
from genpi.train.trainer import load_for_training, step_loss
from tests.fakes import mini_spec
from tests.train.tiny import grads, reference_mean, short_pairs, tcfg


def run(model, step, cfg: TrainConfig, pad_id: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """One step's losses and gradients under ``cfg`` (the objective prepares the examples first)."""
    model.zero_grad(set_to_none=True)
    objective = objective_for(cfg)
    prepared = objective.prepare(step)
    objective.start(model, None)  # the objectives run() takes need no tokenizer
    chosen = objective.select(prepared, 0)
    losses = step_loss(model, chosen, cfg, pad_id, backward=True, objective=objective)
    out = grads(model)
    model.zero_grad(set_to_none=True)
    return losses, out


def assert_same_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if exact:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_every_method_is_registered_and_configurable() -> None:
    assert set(OBJECTIVES) == set(dataclasses.fields(TrainConfig)[0].metadata["choices"])
    for name in OBJECTIVES:
        assert objective_for(tcfg(method=name)).name == name


@pytest.mark.timeout(120)
def test_genpi_at_lambda_zero_is_exactly_sft(lora_model) -> None:
    model, tok = lora_model
    step = short_pairs(tok)
    genpi_losses, genpi_grads = run(model, step, tcfg(method="genpi", pg_lambda=0.0, pg_fraction=1.0), tok.pad_token_id)
    sft_losses, sft_grads = run(model, step, tcfg(method="sft", pg_lambda=0.7), tok.pad_token_id)
    assert genpi_losses["loss"] == sft_losses["loss"] and sft_losses["pg_loss"] == 0.0
    assert_same_grads(genpi_grads, sft_grads)
    # and the PG term really is there at lambda > 0
    with_pg, _ = run(model, step, tcfg(method="genpi", pg_lambda=0.5, pg_fraction=1.0), tok.pad_token_id)
    assert with_pg["loss"] != pytest.approx(sft_losses["loss"], rel=1e-3)


@pytest.mark.timeout(120)
def test_gradient_accumulation_1x8_equals_8x1(lora_model) -> None:
    model, tok = lora_model
    step = (short_pairs(tok) * 2)[:8]
    for method in ("genpi", "seqkd-kld", "genpi-kld"):
        one, one_grads = run(
            model, step, tcfg(method=method, batch_size=8, micro_batch_size=8, pg_fraction=1.0), tok.pad_token_id
        )
        eight, eight_grads = run(
            model, step, tcfg(method=method, batch_size=8, micro_batch_size=1, pg_fraction=1.0), tok.pad_token_id
        )
        for key in one:
            assert eight[key] == pytest.approx(one[key], rel=1e-5), (method, key)
        assert_same_grads(one_grads, eight_grads, exact=False)


@pytest.mark.timeout(120)
def test_prepend_at_fraction_zero_is_exactly_sft_and_at_one_trains_the_teacher_view(lora_model) -> None:
    model, tok = lora_model
    step = short_pairs(tok)
    sft_losses, sft_grads = run(model, step, tcfg(method="sft"), tok.pad_token_id)
    none, none_grads = run(model, step, tcfg(method="prepend", prepend_fraction=0.0), tok.pad_token_id)
    assert none["loss"] == sft_losses["loss"]
    assert_same_grads(none_grads, sft_grads)
    every, _ = run(model, step, tcfg(method="prepend", prepend_fraction=1.0), tok.pad_token_id)
    with torch.no_grad():
        expected = reference_mean(model, [e.teacher for e in step if e.teacher is not None]).item()
    assert every["loss"] == pytest.approx(expected, rel=1e-5)
    assert [prepended(k, 0.5) for k in range(6)] == [False, True, False, True, False, True]
    assert [prepended(k, 1.0) for k in range(3)] == [True] * 3 and not any(prepended(k, 0.0) for k in range(9))


def test_kl_of_a_model_with_itself_is_zero_and_has_no_gradient() -> None:
    logits = torch.randn(5, 11, dtype=torch.float64, requires_grad=True)
    kl = summed_kl(logits, logits.detach())
    kl.backward()
    assert kl.item() == pytest.approx(0.0, abs=1e-12)
    assert logits.grad.abs().max().item() < 1e-6  # float32 inside: rounding only
    other = torch.randn(5, 11, dtype=torch.float64)
    assert summed_kl(logits, other).item() > 0


@pytest.mark.timeout(120)
def test_loading_for_training_keeps_pefts_deprecation_warning_out_of_the_job_log() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_for_training(tcfg(), TINY, "float32")
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


@pytest.mark.timeout(120)
def test_seqkd_kld_is_sft_plus_weighted_kl_and_vanishes_against_itself(tokenizer) -> None:
    model, tok = load_for_training(tcfg(), TINY, "float32")  # fresh LoRA: B = 0, so adapter on == off
    step = short_pairs(tok)
    same = [RecordExamples(e.sft, None, e.sft) for e in step]  # the teacher view without a prompt
    losses, kl_grads = run(model, same, tcfg(method="seqkd-kld", kl_weight=3.0), tok.pad_token_id)
    _, sft_grads = run(model, same, tcfg(method="sft"), tok.pad_token_id)
    assert losses["kl_loss"] == pytest.approx(0.0, abs=1e-6)
    assert_same_grads(kl_grads, sft_grads, exact=False)

    with_prompt, _ = run(model, step, tcfg(method="seqkd-kld", kl_weight=3.0), tok.pad_token_id)
    assert with_prompt["kl_loss"] > 1e-4  # the system prompt changes the teacher's distributions
    assert with_prompt["loss"] == pytest.approx(with_prompt["sft_loss"] + 3.0 * with_prompt["kl_loss"], rel=1e-6)


@pytest.mark.timeout(120)
def test_genpi_kld_adds_the_kl_to_the_sft_term_and_at_weight_zero_is_exactly_genpi(lora_model) -> None:
    model, tok = lora_model
    step = short_pairs(tok)
    genpi, genpi_grads = run(model, step, tcfg(method="genpi", pg_lambda=0.4, pg_fraction=1.0), tok.pad_token_id)
    zero, zero_grads = run(
        model, step, tcfg(method="genpi-kld", pg_lambda=0.4, pg_fraction=1.0, kl_weight=0.0), tok.pad_token_id
    )
    assert zero["loss"] == pytest.approx(genpi["loss"], rel=1e-6) and zero["kl_loss"] > 1e-4
    assert zero["sft_loss"] == pytest.approx(genpi["sft_loss"], rel=1e-6)
    assert zero["pg_loss"] == pytest.approx(genpi["pg_loss"], rel=1e-6)
    assert_same_grads(genpi_grads, zero_grads, exact=False)
    two, _ = run(model, step, tcfg(method="genpi-kld", pg_lambda=0.4, pg_fraction=1.0, kl_weight=2.0), tok.pad_token_id)
    # (1 - λ)(SFT + 2 KL) + λ PG, each term over the whole step's tokens
    want = 0.6 * (two["sft_loss"] + 2.0 * two["kl_loss"]) + 0.4 * two["pg_loss"]
    assert two["loss"] == pytest.approx(want, rel=1e-5) and two["kl_loss"] == pytest.approx(zero["kl_loss"], rel=1e-5)


def test_shared_opening_stops_before_the_first_label() -> None:
    a = Example([1, 2, 3, 4, 5], [IGNORE, IGNORE, IGNORE, 4, 5])
    b = Example([1, 2, 3, 9, 9], [IGNORE, IGNORE, IGNORE, IGNORE, 9])
    assert shared_opening([a, b]) == 2  # token 3 predicts a's first label: a's own
    assert shared_opening([a, Example([1, 7, 3], [IGNORE] * 3)]) == 1
    assert shared_opening([Example([1, 2, 3], [IGNORE] * 3)]) == 2  # one token left to read
    assert shared_opening([]) == 0


@pytest.mark.timeout(120)
def test_teacher_logits_from_the_cached_prompt_equal_a_full_forward(lora_model) -> None:
    model, tok = lora_model
    prompt = "You run shell commands for the user. Reply with one Act: line, then stop. " * 4
    views = [
        tokenize_chat(
            tok,
            [
                {"role": "system", "content": prompt},
                {"role": "user", "content": q},
                {"role": "assistant", "content": a},
            ],
            label_from=1,
        )
        for q, a in [
            ("count files", "Act: bash ls | wc -l"),
            ("date?", "Act: bash date"),
            ("who am i on this machine", "Act: bash whoami"),
        ]
    ]
    prefix = TeacherPrefix(model, views)
    assert len(prefix.tokens) >= 32 and all(v.input_ids[: len(prefix.tokens)] == prefix.tokens for v in views)
    model.train()
    for batch in (views, views[1:2]):
        got, got_targets = prefix.label_logits(model, batch, tok.pad_token_id)
        with torch.no_grad(), model.disable_adapter():
            want, want_targets = label_logits(model, collate(batch, tok.pad_token_id, model.device))
        assert torch.equal(got_targets, want_targets) and not got.requires_grad
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert model.training  # the teacher's eval mode is undone
    with torch.no_grad():
        adapted, _ = label_logits(model, collate(batch, tok.pad_token_id, model.device))
    assert (adapted - got).abs().max() > 1e-3  # the adapter was really off for the teacher
    stranger = tokenize_chat(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Act: x"}])
    got, _ = prefix.label_logits(model, [stranger], tok.pad_token_id)  # no shared opening: read whole
    with torch.no_grad(), model.disable_adapter():
        want, _ = label_logits(model, collate([stranger], tok.pad_token_id, model.device))
    torch.testing.assert_close(got, want)


def onpolicy(model, tok, **changes):
    cfg = tcfg(method="onpolicy-kl", onpolicy_max_tokens=5, **changes)
    objective = objective_for(cfg)
    objective.total_steps = 10
    objective.start(model, tok)
    return cfg, objective


@pytest.mark.timeout(120)
def test_onpolicy_kl_warms_up_as_sft_then_learns_reverse_kl_on_its_own_samples(lora_model) -> None:
    model, tok = lora_model
    step = short_pairs(tok)
    sft_losses, sft_grads = run(model, step, tcfg(method="sft"), tok.pad_token_id)
    cfg, objective = onpolicy(model, tok, onpolicy_warmup=0.5)
    model.zero_grad(set_to_none=True)
    warm = step_loss(model, objective.select(step, 4), cfg, tok.pad_token_id, backward=True, objective=objective)
    assert warm["loss"] == sft_losses["loss"]  # steps 0-4 of 10: SFT
    assert_same_grads(grads(model), sft_grads)

    torch.manual_seed(0)
    sampled = objective.select(step, 5)  # on-policy from step 5 on
    assert len(sampled) == 4 and all(
        type(e).__name__ == "Sampled" for e in sampled
    )  # the record without turns has none
    for e, source in zip(sampled, [x for x in step if x.student_opening]):
        reply = e.sft.input_ids[len(source.student_opening) :]
        assert e.sft.input_ids[: len(source.student_opening)] == source.student_opening and 1 <= len(reply) <= 5
        assert e.teacher.input_ids == source.teacher_opening + reply  # the same sample, read with the prompt
        assert e.sft.labels == [-100] * len(source.student_opening) + reply
    model.zero_grad(set_to_none=True)
    losses = step_loss(model, sampled, cfg, tok.pad_token_id, backward=True, objective=objective)
    assert losses["reverse_kl"] > 0 and losses["loss"] == pytest.approx(losses["reverse_kl"], rel=1e-6)
    assert any(g.abs().sum() > 0 for g in grads(model).values())
    model.zero_grad(set_to_none=True)


@pytest.mark.timeout(120)
def test_onpolicy_kl_against_itself_is_zero(tokenizer) -> None:
    model, tok = load_for_training(tcfg(), TINY, "float32")  # fresh LoRA: adapter on == off
    same = [dataclasses.replace(e, teacher_opening=e.student_opening) for e in short_pairs(tok)]
    cfg, objective = onpolicy(model, tok, onpolicy_warmup=0.0)
    losses = step_loss(model, objective.select(same, 0), cfg, tok.pad_token_id, backward=False, objective=objective)
    assert losses["reverse_kl"] == pytest.approx(0.0, abs=1e-6)


def test_teacher_example_labels_only_the_records_turns(tokenizer) -> None:
    from genpi.train.examples import ExampleReport

    spec = mini_spec()
    record = {
        "input": "List /tmp.",
        "turns": [
            {"agent": "Think: list.\nAct: bash", "observation": "a b", "agent_finish": "stop"},
            {"agent": "Think: done.\nAct: finish", "observation": "", "agent_finish": "stop"},
        ],
    }
    example = teacher_example(tokenizer, record, spec, 4096, ExampleReport())
    labelled = tokenizer.decode([t for t, lab in zip(example.input_ids, example.labels) if lab != -100])
    assert labelled.count("<|im_end|>") == 2 and "Think: list.\nAct: bash" in labelled
    assert "Think: done.\nAct: finish" in labelled and "42" not in labelled  # the prompt's own examples: no label
    assert teacher_example(tokenizer, {**record, "turns": []}, spec, 4096, ExampleReport()) is None
    report = ExampleReport()
    shorter = teacher_example(tokenizer, record, spec, len(example.input_ids) - 1, report)
    assert shorter is not None and report.teacher_turns_dropped == 1


# ------------------------------------------------------------------ checkpoints and resume


class Interrupt(RuntimeError):
    pass


class StopAfter:
    """Checkpoints in a store that raise right after saving the one of step ``step`` (a killed run)."""

    def __init__(self, inner, step: int) -> None:
        self.inner, self.step = inner, step

    def latest(self):
        return self.inner.latest()

    def save(self, folder, step, metrics):
        self.inner.save(folder, step, metrics)
        if step == self.step:
            raise Interrupt(f"killed after step {step}")


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "method, checkpoint_steps, stop",
    [("genpi", 0, 2), ("genpi", 1, 3), ("seqkd-kld", 1, 3), ("onpolicy-kl", 1, 3)],
)
def test_a_resumed_run_ends_with_the_same_losses_and_adapter(
    tokenizer, tmp_path, method: str, checkpoint_steps: int, stop: int
) -> None:
    """Stopped after an epoch (step 2 of 3 epochs x 2 steps), or inside one (step 3, checkpointing every step)."""
    from safetensors.torch import load_file

    from genpi.store import LocalStore
    from genpi.train.checkpoints import StoreCheckpoints
    from genpi.train.trainer import train_adapter

    examples = short_pairs(tokenizer)
    cfg = tcfg(
        method=method,
        epochs=3,
        batch_size=2,
        micro_batch_size=1,
        learning_rate=5e-3,
        lora_r=2,
        lora_alpha=4,
        lora_dropout=0.1,
        pg_fraction=0.5,
        onpolicy_warmup=0.3,
        onpolicy_max_tokens=6,
        checkpoint_steps=checkpoint_steps,
    )  # dropout and on-policy sampling: the torch RNG state matters too
    store = LocalStore(tmp_path / "store")
    whole = train_adapter(
        cfg,
        TINY,
        "float32",
        examples[:4],
        examples[4:],
        tmp_path / "whole",
        log=lambda _: None,
        checkpoints=StoreCheckpoints(store, "a/checkpoints", tmp_path / "scratch-a"),
    )
    saved = StoreCheckpoints(store, "b/checkpoints", tmp_path / "scratch-b")
    with pytest.raises(Interrupt):
        train_adapter(
            cfg,
            TINY,
            "float32",
            examples[:4],
            examples[4:],
            tmp_path / "cut",
            log=lambda _: None,
            checkpoints=StopAfter(saved, stop),
        )
    assert saved._steps() == [stop]  # only the newest checkpoint is kept
    lines: list[str] = []
    resumed = train_adapter(
        cfg, TINY, "float32", examples[:4], examples[4:], tmp_path / "resumed", log=lines.append, checkpoints=saved
    )
    assert resumed["resumed_at_step"] == stop
    assert lines[0].startswith(f"resumed at step {stop}/6 (epoch {stop // 2 + 1})")
    assert len(lines) == 1 + 6 - stop + 1  # the steps left and the validation line
    assert resumed["history"] == whole["history"]  # the same loss curve, step for step
    a, b = (
        load_file(tmp_path / "whole/adapter_model.safetensors"),
        load_file(tmp_path / "resumed/adapter_model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert saved._steps() == [6]
