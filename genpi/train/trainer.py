"""The training loop for one LoRA adapter, readable top to bottom.

QLoRA (4-bit NF4 base, double quantization, bf16 compute) on CUDA; bf16 LoRA on CPU, where
bitsandbytes NF4 silently stops gradients. Each optimizer step takes ``batch_size`` records and
applies the joint loss over their SFT and PG examples, accumulated over micro-batches.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any, Callable

import torch

from genpi.config import TrainConfig
from genpi.engines.hf import DTYPES, pick_device
from genpi.engines.models import resolve_model
from genpi.train.examples import IGNORE, Example
from genpi.train.loss import joint_loss, label_tokens, summed_token_loss

Pair = tuple[Example | None, Example | None]


def collate(examples: list[Example], pad_id: int, device: torch.device | str) -> dict[str, torch.Tensor]:
    """Right-padded tensors; padding carries no loss (the mask is for callers that need one)."""
    width = max(len(e.input_ids) for e in examples)
    ids = [e.input_ids + [pad_id] * (width - len(e.input_ids)) for e in examples]
    labels = [e.labels + [IGNORE] * (width - len(e.labels)) for e in examples]
    mask = [[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in examples]
    return {"input_ids": torch.tensor(ids, device=device), "labels": torch.tensor(labels, device=device),
            "attention_mask": torch.tensor(mask, device=device)}


def load_for_training(cfg: TrainConfig, model_name: str, dtype: str) -> tuple[Any, Any]:
    """The base model wrapped with a fresh LoRA adapter, and its tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = pick_device("auto")
    quantize = cfg.quantization == "nf4" or (cfg.quantization == "auto" and device == "cuda")
    folder = resolve_model(model_name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if quantize:
        from genpi.train.qlora import load_nf4

        model = load_nf4(folder, cfg.gradient_checkpointing)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype]).to(device)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    targets: Any = cfg.target_modules if cfg.target_modules == "all-linear" else \
        [m.strip() for m in cfg.target_modules.split(",") if m.strip()]
    torch.manual_seed(cfg.seed)
    layers = None
    if cfg.lora_layers:
        depth = model.config.num_hidden_layers
        layers = list(range(max(0, depth - cfg.lora_layers), depth))
        if targets == "all-linear":  # PEFT takes layer indices only with explicit module names
            targets = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                              if isinstance(module, torch.nn.Linear) and ".layers." in name})
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, layers_to_transform=layers, task_type="CAUSAL_LM")
    return get_peft_model(model, lora), tokenizer


def _optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter], quantized: bool) -> torch.optim.Optimizer:
    if quantized:
        import bitsandbytes as bnb  # the paper's paged AdamW, CUDA only

        return bnb.optim.PagedAdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def lr_factor(cfg: TrainConfig, step: int, total: int) -> float:
    """Linear warmup, then the configured decay, as a multiple of the peak learning rate."""
    warmup = math.ceil(cfg.warmup_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if cfg.lr_scheduler == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.lr_scheduler == "linear":
        return 1 - progress
    return 1.0


def pg_kept(fraction: float, step: int, batch_size: int) -> int:
    """How many PG examples step ``step`` keeps so that, over the run, ``fraction`` of all records'
    PG examples are used, spread evenly over the steps (0.1 at batch 4: one every 2-3 steps)."""
    return math.floor(fraction * (step + 1) * batch_size + 1e-9) - math.floor(fraction * step * batch_size + 1e-9)


def with_pg_fraction(pairs: list[Pair], keep: int) -> list[Pair]:
    """Keep the first ``keep`` PG examples of a (shuffled) step, drop the others'."""
    out: list[Pair] = []
    for s, p in pairs:
        out.append((s, p if keep > 0 else None))
        keep -= p is not None
    return out


def step_loss(model: Any, pairs: list[Pair], cfg: TrainConfig, pad_id: int, backward: bool) -> dict[str, float]:
    """Joint loss of one optimizer step over ``pairs``, accumulated over micro-batches."""
    device = next(model.parameters()).device
    sft = [s for s, _ in pairs if s is not None]
    pg = [p for _, p in pairs if p is not None]
    n_sft, n_pg = label_tokens(sft), label_tokens(pg)
    totals = {"loss": 0.0, "sft_loss": 0.0, "pg_loss": 0.0}
    for start in range(0, len(pairs), cfg.micro_batch_size):
        micro = pairs[start:start + cfg.micro_batch_size]
        zero = torch.zeros((), device=device)
        sft_mb = [s for s, _ in micro if s is not None]
        pg_mb = [p for _, p in micro if p is not None]
        if not sft_mb and not pg_mb:
            continue
        sft_sum = summed_token_loss(model, collate(sft_mb, pad_id, device)) if sft_mb else zero
        pg_sum = summed_token_loss(model, collate(pg_mb, pad_id, device)) if pg_mb else zero
        loss = joint_loss(sft_sum, n_sft, pg_sum, n_pg, cfg.pg_lambda)
        if backward:
            loss.backward()
        totals["loss"] += loss.item()
        totals["sft_loss"] += sft_sum.item() / n_sft if n_sft else 0.0
        totals["pg_loss"] += pg_sum.item() / n_pg if n_pg else 0.0
    return totals


def train_adapter(cfg: TrainConfig, model_name: str, dtype: str, train_pairs: list[Pair], val_pairs: list[Pair],
                  out_dir: str | Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train one adapter, save it in PEFT format to ``out_dir``; returns the metrics."""
    model, tokenizer = load_for_training(cfg, model_name, dtype)
    quantized = bool(getattr(model, "is_loaded_in_4bit", False))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(cfg, params, quantized)
    pad_id = tokenizer.pad_token_id
    steps_per_epoch = math.ceil(len(train_pairs) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    rng = random.Random(cfg.seed)
    history: list[dict[str, float]] = []
    started = time.time()
    step = 0
    for epoch in range(cfg.epochs):
        order = list(range(len(train_pairs)))
        rng.shuffle(order)
        model.train()
        for start in range(0, len(order), cfg.batch_size):
            batch = with_pg_fraction([train_pairs[i] for i in order[start:start + cfg.batch_size]],
                                     pg_kept(cfg.pg_fraction, step, cfg.batch_size))
            for group in optimizer.param_groups:
                group["lr"] = cfg.learning_rate * lr_factor(cfg, step, total)
            losses = step_loss(model, batch, cfg, pad_id, backward=True)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm else float("inf"))
            if any(s is not None or p is not None for s, p in batch):
                optimizer.step()  # a step left with no example (no SFT turn, PG not drawn) must not move Adam
            optimizer.zero_grad(set_to_none=True)
            step += 1
            history.append({"step": step, "epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                            "grad_norm": float(grad_norm), **losses})
            rate = (time.time() - started) / step
            log(f"step {step}/{total} epoch {epoch + 1} loss {losses['loss']:.4f} "
                f"(sft {losses['sft_loss']:.4f}, pg {losses['pg_loss']:.4f}) {rate:.1f}s/step, "
                f"{rate * (total - step):.0f}s left")
        if val_pairs and epoch == cfg.epochs - 1:  # held-out fidelity is the evaluate stage's; one loss here
            model.eval()
            with torch.no_grad():
                val = step_loss(model, val_pairs, cfg, pad_id, backward=False)
            history[-1].update({f"val_{k}": v for k, v in val.items()})
            log(f"epoch {epoch + 1} validation loss {val['loss']:.4f}")
    model.save_pretrained(str(out_dir))
    trainable = sum(p.numel() for p in params)
    return {"steps": step, "epochs": cfg.epochs, "seconds": round(time.time() - started, 2),
            "trainable_params": trainable, "total_params": sum(p.numel() for p in model.parameters()),
            "quantized_nf4": quantized, "device": str(next(model.parameters()).device),
            "final": history[-1] if history else {}, "history": history}
