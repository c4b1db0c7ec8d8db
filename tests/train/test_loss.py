"""The step loss and its micro-batch invariance, collation, the learning-rate schedule."""

from __future__ import annotations

import pytest
import torch

from genpi.train.batches import collate
from genpi.train.examples import (
    IGNORE,
    Example,
    RecordExamples,
)
from genpi.train.trainer import lr_factor, step_loss
from tests.train.tiny import grads, reference_mean, short_pairs, tcfg


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
    with_empty = step_loss(
        model, pairs + [RecordExamples(None, None)], tcfg(micro_batch_size=1), tok.pad_token_id, backward=True
    )
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
