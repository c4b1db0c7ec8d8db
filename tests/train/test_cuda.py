"""The CUDA training path on the tiny model: QLoRA as the paper's (NF4 base with double
quantization, bf16 compute, paged AdamW, gradient checkpointing). It runs where there is a CUDA GPU
and bitsandbytes (a GPU node, the lent GPU machine) and is skipped with the reason elsewhere: on CPU
NF4 silently stops gradients, so genpi never quantizes there."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from genpi.models import TINY, resolve_model
from genpi.train.trainer import (
    load_for_training,
    make_optimizer,
    step_loss,
    train_adapter,
)
from tests.train.tiny import short_pairs, tcfg

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None,
    reason="QLoRA needs a CUDA GPU and bitsandbytes (pip install 'genpi[gpu]'); CPU trains bf16 LoRA",
)


def qcfg(**changes):
    return tcfg(quantization="auto", gradient_checkpointing=True, **changes)


def test_qlora_base_is_nf4_double_quantized_with_bf16_compute() -> None:
    import bitsandbytes as bnb

    model, _ = load_for_training(qcfg(), TINY, "bfloat16")
    assert model.is_loaded_in_4bit
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    for module in quantized:
        assert module.weight.quant_type == "nf4" and module.weight.quant_state.nested  # double quantization
        assert module.compute_dtype == torch.bfloat16
    assert all("lora_" in name for name, p in model.named_parameters() if p.requires_grad)
    assert model.base_model.model.is_gradient_checkpointing


def test_qlora_gradients_reach_the_adapter_and_paged_adamw_moves_it(tokenizer) -> None:
    import bitsandbytes as bnb

    cfg = qcfg(learning_rate=1e-2, warmup_ratio=0.0)
    model, tok = load_for_training(cfg, TINY, "bfloat16")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params, quantized=True)
    assert isinstance(optimizer, bnb.optim.PagedAdamW)
    model.train()
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in named.items()}
    for _ in range(2):  # B starts at zero, so A's gradient appears from the second step on
        step_loss(model, short_pairs(tok)[:3], cfg, tok.pad_token_id, backward=True)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in named.values())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert all(not torch.equal(before[n], p.detach()) for n, p in named.items())


def test_step_loss_is_independent_of_micro_batch_size_under_nf4(tokenizer) -> None:
    model, tok = load_for_training(qcfg(), TINY, "bfloat16")
    model.eval()
    pairs = short_pairs(tok)
    with torch.no_grad():
        whole = step_loss(model, pairs, qcfg(micro_batch_size=len(pairs)), tok.pad_token_id, backward=False)
        one = step_loss(model, pairs, qcfg(micro_batch_size=1), tok.pad_token_id, backward=False)
    assert one["loss"] == pytest.approx(whole["loss"], rel=2e-2)  # bf16 compute: padding shifts the last bits


@pytest.mark.timeout(300)
def test_train_adapter_on_cuda_is_qlora_lowers_the_loss_and_loads_back(tokenizer, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    pairs = short_pairs(tokenizer)
    cfg = qcfg(batch_size=3, learning_rate=1e-2, warmup_ratio=0.0, lr_scheduler="constant", min_steps=8)
    metrics = train_adapter(cfg, TINY, "bfloat16", pairs[:3], pairs[3:], tmp_path / "adapter", log=lambda line: None)
    assert metrics["quantized_nf4"] and metrics["device"].startswith("cuda")
    losses = [h["loss"] for h in metrics["history"]]
    # the same 3 records every step; the tiny random model starts near ln(vocab) ~ 10.8 nats
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.2
    base = AutoModelForCausalLM.from_pretrained(resolve_model(TINY), dtype=torch.bfloat16)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))  # an NF4-trained adapter on a bf16 base
    ids = torch.tensor([tokenizer.encode("count files")])
    assert torch.isfinite(loaded(input_ids=ids).logits).all()
