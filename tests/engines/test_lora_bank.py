"""The hf engine's adapter path against PEFT: one adapter op for op, per-row mixes, merged weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from genpi.engines.lora_bank import LoraBank
from genpi.errors import ModelError
from genpi.models import TINY, resolve_model


def lora_folder(folder: Path, seed: int, layers: list[str], r: int = 4, **extra) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(TINY), dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=16, target_modules=layers, init_lora_weights=False, **extra)
    get_peft_model(model, config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("bank")
    return [
        lora_folder(root / "a", 1, ["q_proj", "v_proj", "down_proj"]),
        lora_folder(root / "b", 2, ["k_proj", "o_proj", "up_proj", "gate_proj"], r=8),
    ]


def base_model(dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(resolve_model(TINY), dtype=dtype).eval()


IDS = torch.tensor([[5, 17, 99, 3, 250, 41], [7, 7, 120, 64, 2, 9], [11, 300, 12, 13, 14, 15]])


@torch.inference_mode()
def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def test_one_adapter_equals_peft_bit_for_bit_in_bf16(folders: list[Path]) -> None:
    from peft import PeftModel

    bank_model = base_model(torch.bfloat16)
    bank = LoraBank(bank_model)
    bank.add("a", folders[0])
    with bank.use("a"):
        ours = logits(bank_model)
    theirs = logits(PeftModel.from_pretrained(base_model(torch.bfloat16), str(folders[0])).eval())
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, logits(bank_model))  # outside `use` the base model answers


def test_rows_mix_adapters_and_the_base_model_as_each_alone(folders: list[Path]) -> None:
    model = base_model(torch.float32)
    bank = LoraBank(model)
    bank.add("a", folders[0])
    bank.add("b", folders[1])
    alone = {}
    for name in ("a", "b", None):
        with bank.use(name):
            alone[name] = logits(model)
    names = ["b", None, "a"]
    with bank.use_rows(names):
        mixed = logits(model)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], alone[name][row], rtol=1e-5, atol=1e-5)
    assert all(layer.rows is None for layer in bank.layers.values())  # nothing left behind
    with bank.use_rows(["a", "a", None]):  # another mix of the same adapters: the stacks are reused
        again = logits(model)
    torch.testing.assert_close(again[:2], alone["a"][:2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again[2], alone[None][2], rtol=1e-5, atol=1e-5)
    bank.remove("a")  # its stacked columns go with it
    assert bank._stacked is None


def test_merged_weights_answer_as_the_factors_and_are_dropped_least_recently_used(folders: list[Path]) -> None:
    model = base_model(torch.float32)
    bank = LoraBank(model, max_merged=1)
    bank.add("a", folders[0])
    bank.add("b", folders[1])
    originals = {name: layer.base.weight for name, layer in bank.layers.items()}
    for name in ("a", "b"):
        with bank.use(name):
            unmerged = logits(model)
        with bank.use(name, merge=True):
            merged = logits(model)
        torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
        assert not torch.equal(merged, logits(model))
    assert list(bank._merged) == ["b"]  # at most one copy: a's was dropped
    assert all(layer.base.weight is originals[name] for name, layer in bank.layers.items())
    bank.remove("b")
    assert not bank._merged and all("b" not in layer.factors for layer in bank.layers.values())


def test_adapters_it_cannot_serve_are_refused_saying_why(folders: list[Path], tmp_path: Path) -> None:
    bank = LoraBank(base_model(torch.float32))
    dora = lora_folder(tmp_path / "dora", 3, ["q_proj"], use_dora=True)
    with pytest.raises(ModelError, match="DoRA"):
        bank.add("dora", dora)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (wrong / name).write_bytes((folders[0] / name).read_bytes())
    config = json.loads((wrong / "adapter_config.json").read_text())
    from safetensors.torch import load_file, save_file

    tensors = {
        k.replace("q_proj", "embed_tokens"): v for k, v in load_file(wrong / "adapter_model.safetensors").items()
    }
    save_file(tensors, wrong / "adapter_model.safetensors")
    (wrong / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="not a linear layer"):
        bank.add("wrong", wrong)
    assert bank.names == []
