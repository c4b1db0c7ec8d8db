"""QLoRA base loading: 4-bit NF4 weights with double quantization and bf16 compute (CUDA only).

Isolated here because it needs bitsandbytes (the ``gpu`` extra); on CPU, NF4 silently stops
gradients after a no-grad forward, so the trainer never calls this there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from genpi.errors import ConfigError


def load_nf4(folder: Path, gradient_checkpointing: bool) -> Any:
    """The base model in NF4 on the current CUDA device, prepared for k-bit training."""
    if not torch.cuda.is_available():
        raise ConfigError("train.quantization nf4 needs a CUDA GPU; set train.quantization to none on CPU")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("train.quantization nf4 needs bitsandbytes: pip install 'genpi[gpu]'") from None
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=quant, dtype=torch.bfloat16, device_map={"": torch.cuda.current_device()}
    )
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
