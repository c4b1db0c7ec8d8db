"""The training loop for one LoRA adapter, readable top to bottom.

QLoRA (4-bit NF4 base, double quantization, bf16 compute) on CUDA; bf16 LoRA on CPU, where
bitsandbytes NF4 silently stops gradients. Each optimizer step takes ``batch_size`` records and
applies the configured objective (:mod:`genpi.train.objectives`) to their examples,
accumulated over micro-batches.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from genpi.config import TrainConfig
from genpi.devices import DTYPES, pick_device
from genpi.models import resolve_model
from genpi.train.checkpoints import Checkpoints, Progress, load_state, save_state
from genpi.train.examples import RecordExamples
from genpi.train.objectives import Objective, objective_for


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
    targets: Any = (
        cfg.target_modules
        if cfg.target_modules == "all-linear"
        else [m.strip() for m in cfg.target_modules.split(",") if m.strip()]
    )
    torch.manual_seed(cfg.seed)
    layers = None
    if cfg.lora_layers:
        depth = model.config.num_hidden_layers
        layers = list(range(max(0, depth - cfg.lora_layers), depth))
        if targets == "all-linear":  # PEFT takes layer indices only with explicit module names
            targets = sorted(
                {
                    name.rsplit(".", 1)[-1]
                    for name, module in model.named_modules()
                    if isinstance(module, torch.nn.Linear) and ".layers." in name
                }
            )
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        layers_to_transform=layers,
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # PEFT reads transformers' deprecated alias: a FutureWarning in every job log, not ours to fix
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        return get_peft_model(model, lora), tokenizer


def sort_target_modules(config_file: Path) -> None:
    """PEFT writes ``target_modules`` from a set, in an order that changes from one process to the
    next: sorted, the same run gives the same adapter bytes."""
    config = json.loads(config_file.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True))


def parameter_groups(cfg: TrainConfig, model: torch.nn.Module) -> list[dict[str, Any]]:
    """The trainable parameters as optimizer groups, each with the multiple of the learning rate it
    trains at (``lr_scale``): LoRA's B matrices at ``cfg.loraplus_lr_ratio`` (LoRA+), the rest at 1."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if cfg.loraplus_lr_ratio == 1:
        return [{"params": [p for _, p in trainable], "lr_scale": 1.0}]
    return [
        {"params": [p for name, p in trainable if "lora_B" not in name], "lr_scale": 1.0},
        {"params": [p for name, p in trainable if "lora_B" in name], "lr_scale": cfg.loraplus_lr_ratio},
    ]


def make_optimizer(cfg: TrainConfig, groups: list[dict[str, Any]], quantized: bool) -> torch.optim.Optimizer:
    """Paged AdamW (bitsandbytes) over an NF4 base, as the paper; plain AdamW otherwise."""
    if quantized:
        import bitsandbytes as bnb  # the paper's paged AdamW, CUDA only

        return bnb.optim.PagedAdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


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


def step_loss(
    model: Any,
    step: list[RecordExamples],
    cfg: TrainConfig,
    pad_id: int,
    backward: bool,
    objective: Objective | None = None,
) -> dict[str, float]:
    """The objective's loss of one optimizer step over ``step``, accumulated over micro-batches
    (backward after each, so only one micro-batch's graph is alive at a time)."""
    objective = objective or objective_for(cfg)
    counts = objective.token_counts(step)
    totals: dict[str, float] = {"loss": 0.0}
    for start in range(0, len(step), cfg.micro_batch_size):
        out = objective.micro_loss(model, step[start : start + cfg.micro_batch_size], counts, pad_id)
        if out is None:
            continue
        loss, terms = out
        if backward:
            loss.backward()
        totals["loss"] += loss.item()
        for name, value in terms.items():
            totals[name] = totals.get(name, 0.0) + value
    return totals


def train_adapter(
    cfg: TrainConfig,
    model_name: str,
    dtype: str,
    train_examples: list[RecordExamples],
    val_examples: list[RecordExamples],
    out_dir: str | Path,
    log: Callable[[str], None] = print,
    checkpoints: Checkpoints | None = None,
    on_step: Callable[[int, float, float], None] | None = None,
) -> dict[str, Any]:
    """Train one adapter with ``cfg.method``, save it in PEFT format to ``out_dir``; returns the metrics.

    ``on_step(step, loss, supervised tokens per second)`` is called after every optimizer step.

    With ``checkpoints``, the run's state is saved after every epoch and every
    ``cfg.checkpoint_steps`` optimizer steps, and a run that finds a saved state resumes from it:
    same losses, same adapter as a run never stopped.
    """
    objective = objective_for(cfg)
    train_examples, val_examples = objective.prepare(train_examples), objective.prepare(val_examples)
    model, tokenizer = load_for_training(cfg, model_name, dtype)
    quantized = bool(getattr(model, "is_loaded_in_4bit", False))
    groups = parameter_groups(cfg, model)
    params = [p for group in groups for p in group["params"]]
    optimizer = make_optimizer(cfg, groups, quantized)
    pad_id = tokenizer.pad_token_id
    steps_per_epoch = math.ceil(len(train_examples) / cfg.batch_size)
    # Few records (a strict format filter) must not mean few updates: epochs are added, the last
    # one possibly partial, until the run takes train.min_steps steps.
    total = max(steps_per_epoch * cfg.epochs, cfg.min_steps)
    epochs = math.ceil(total / steps_per_epoch)
    objective.total_steps = total
    objective.start(model, tokenizer)
    rng = random.Random(cfg.seed)
    done = Progress(0, 0, [])
    saved = checkpoints.latest() if checkpoints else None
    if saved is not None:
        done = load_state(saved, model, optimizer, rng)
        log(f"resumed at step {done.step}/{total} (epoch {done.epoch + 1}) from {saved}")
    history, step, order = done.history, done.step, done.order

    def checkpoint(epochs_done: int, epoch_order: list[int] | None) -> None:
        with tempfile.TemporaryDirectory(prefix="genpi-ckpt-") as tmp:
            save_state(Path(tmp), model, optimizer, rng, epochs_done, step, history, epoch_order)
            checkpoints.save(Path(tmp), step, history[-1] if history else {})

    started, start_step = time.time(), step
    for epoch in range(done.epoch, epochs):
        if order is None:  # a new epoch (a checkpoint inside one brings that epoch's order)
            order = list(range(len(train_examples)))
            rng.shuffle(order)
        model.train()
        # every epoch before the last has steps_per_epoch steps: those of this one already done are skipped
        for start in range((step - epoch * steps_per_epoch) * cfg.batch_size, len(order), cfg.batch_size):
            if step == total:
                break
            step_started = time.time()
            batch = objective.select([train_examples[i] for i in order[start : start + cfg.batch_size]], step)
            for group in optimizer.param_groups:
                group["lr"] = cfg.learning_rate * group["lr_scale"] * lr_factor(cfg, step, total)
            losses = step_loss(model, batch, cfg, pad_id, backward=True, objective=objective)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm else float("inf"))
            if any(e.any() for e in batch):
                optimizer.step()  # a step left with no example (no SFT turn, PG not drawn) must not move Adam
            optimizer.zero_grad(set_to_none=True)
            step += 1
            history.append(
                {
                    "step": step,
                    "epoch": epoch,
                    "lr": optimizer.param_groups[0]["lr"],
                    "grad_norm": float(grad_norm),
                    **losses,
                }
            )
            rate = (time.time() - started) / (step - start_step)
            terms = ", ".join(f"{k.removesuffix('_loss')} {v:.4f}" for k, v in losses.items() if k != "loss")
            log(
                f"step {step}/{total} epoch {epoch + 1} loss {losses['loss']:.4f} ({terms}) {rate:.1f}s/step, "
                f"{rate * (total - step):.0f}s left"
            )
            if on_step is not None:
                tokens = sum(objective.token_counts(batch).values())
                on_step(step, losses["loss"], tokens / max(time.time() - step_started, 1e-9))
            epoch_ends = step == total or start + cfg.batch_size >= len(order)
            if checkpoints is not None and cfg.checkpoint_steps and step % cfg.checkpoint_steps == 0 and not epoch_ends:
                checkpoint(epoch, order)
        order = None
        if val_examples and epoch == epochs - 1:  # held-out fidelity is the evaluate stage's; one loss here
            model.eval()
            with torch.no_grad():
                val = step_loss(model, val_examples, cfg, pad_id, backward=False, objective=objective)
            history[-1].update({f"val_{k}": v for k, v in val.items()})
            log(f"epoch {epoch + 1} validation loss {val['loss']:.4f}")
        if checkpoints is not None:
            checkpoint(epoch + 1, None)
    model.save_pretrained(str(out_dir))
    sort_target_modules(Path(out_dir) / "adapter_config.json")
    trainable = sum(p.numel() for p in params)
    return {
        "method": objective.name,
        "steps": step,
        "epochs": epochs,
        "seconds": round(time.time() - started, 2),
        "resumed_at_step": done.step,
        "trainable_params": trainable,
        "total_params": sum(p.numel() for p in model.parameters()),
        "quantized_nf4": quantized,
        "device": str(next(model.parameters()).device),
        "final": history[-1] if history else {},
        "history": history,
    }
