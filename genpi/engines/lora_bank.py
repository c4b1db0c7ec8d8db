"""Many LoRA adapters over one copy of the base weights: per row, all rows alike, or merged.

The hf engine's adapter path (PEFT stays the trainer's). Each linear layer an adapter touches is
wrapped once; the wrapper holds every loaded adapter's factors for that layer and applies, per
forward, what the engine asked for:

- **one adapter for the whole batch** (:meth:`LoraBank.use`): the same operations as PEFT's LoRA
  layer (factors in float32, the base output added in float32, cast back), so a reply equals
  PEFT's bit for bit;
- **an adapter per row** (:meth:`LoraBank.use_rows`): the batch's adapters' ``A`` stacked per
  group of layers fed one input (q/k/v) with a row mask (a base-model row is masked out), their
  ``B`` appended to each layer's weight: one extra small product per group and one product per
  layer whatever the mix, instead of PEFT's loop over the adapters in the batch;
- **merged** (:meth:`LoraBank.use` with ``merge=True``): ``W + scale * B @ A`` built once per
  adapter into fresh contiguous tensors (at most ``max_merged`` kept, least recently used
  dropped) and swapped into the layers for the batch: the base model's own speed.

Only plain LoRA is served (no DoRA, biases, saved modules or per-module rank patterns); another
adapter is refused with the reason.
"""

from __future__ import annotations

import contextlib
import json
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from genpi.errors import ModelError

_UNSUPPORTED = {
    "use_dora": "DoRA",
    "modules_to_save": "saved modules",
    "trainable_token_indices": "trained token rows",
    "alpha_pattern": "per-module alpha",
    "rank_pattern": "per-module rank",
    "layer_replication": "layer replication",
}


class Factors:
    """One adapter's factors for one layer: ``A`` (r × in) and ``B`` (out × r), float32."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        self.a, self.b, self.scale = a, b, scale


class SharedInput:
    """The ``A`` products of layers that sit side by side (one parent, one input width: q/k/v/o,
    gate/up) for one call: layers fed the same tensor (q, k and v read one hidden state) compute
    their stacked product once and each takes its slice."""

    def __init__(self, a: torch.Tensor, mask: torch.Tensor) -> None:
        self.a, self.mask = a, mask  # in the model's dtype
        self.x: torch.Tensor | None = None
        self.h: torch.Tensor | None = None

    def product(self, x: torch.Tensor) -> torch.Tensor:
        if x is not self.x:
            if x.shape[0] != self.mask.shape[0]:
                raise ModelError(f"a batch of {x.shape[0]} rows met per-row adapters for {self.mask.shape[0]}")
            self.x, self.h = x, F.linear(x, self.a) * self.mask
        assert self.h is not None
        return self.h


class BankedLinear(nn.Module):
    """A linear layer plus the LoRA factors of every loaded adapter that touches it."""

    def __init__(self, base: nn.Linear, bank: LoraBank) -> None:
        super().__init__()
        self.base = base
        self.factors: dict[str, Factors] = {}
        self.rows: tuple[SharedInput, slice, torch.Tensor] | None = None  # A products, its slice, [W | B]
        self._bank = [bank]  # in a list: not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows is not None:
            return self.forward_rows(x)
        out = self.base(x)
        bank = self._bank[0]
        if bank.active is not None:
            f = self.factors.get(bank.active)
            if f is None:
                return out
            # PEFT's LoRA forward for an adapter kept in float32 over bf16 weights, op for op.
            return (out + F.linear(F.linear(x.to(f.a.dtype), f.a), f.b) * f.scale).to(out.dtype)
        return out

    def forward_rows(self, x: torch.Tensor) -> torch.Tensor:
        """An adapter per row: ``[x | x A_k masked] @ [W | B_k]^T``, one product with the base weights."""
        shared, part, extended = self.rows  # type: ignore[misc]
        return F.linear(torch.cat([x, shared.product(x)[..., part]], dim=-1), extended, self.base.bias)


def read_adapter(folder: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float, dict]:
    """A PEFT LoRA folder's factors by layer name (``model.layers.0.self_attn.q_proj``), its scale
    and its ``adapter_config.json``."""
    from safetensors.torch import load_file

    try:
        config = json.loads((folder / "adapter_config.json").read_text())
        tensors = load_file(folder / "adapter_model.safetensors")
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read the LoRA adapter in {folder}: {e}") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise ModelError(f"{folder}: a {config.get('peft_type')} adapter; genpi serves LoRA adapters")
    used = [what for key, what in _UNSUPPORTED.items() if config.get(key)]
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        used.append("biases")
    if used:
        raise ModelError(f"{folder}: this adapter uses {', '.join(used)}; genpi serves plain LoRA adapters")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    scale = alpha / r**0.5 if config.get("use_rslora") else alpha / r
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        for part in ("lora_A", "lora_B"):
            if f".{part}." in key:
                layer = key.split(f".{part}.")[0].removeprefix("base_model.model.")
                pairs.setdefault(layer, {})[part] = tensor.float()
    if not pairs or any(len(p) != 2 for p in pairs.values()):
        raise ModelError(f"{folder}: adapter_model.safetensors holds no complete LoRA factor pairs")
    return {layer: (p["lora_A"], p["lora_B"]) for layer, p in pairs.items()}, scale, config


class LoraBank:
    """The adapters loaded into one model (see the module docstring)."""

    def __init__(self, model: nn.Module, max_merged: int = 0) -> None:
        self.model, self.max_merged = model, max_merged
        self.layers: dict[str, BankedLinear] = {}
        self.configs: dict[str, dict] = {}  # each loaded adapter's adapter_config.json
        self.active: str | None = None  # the one adapter of the current forward, unmerged
        self._merged: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._stacked: tuple[tuple[str, ...], list] | None = None  # the last mixed batch's adapters and stacks

    def add(self, name: str, folder: Path) -> None:
        """Load the LoRA adapter in ``folder`` as ``name``."""
        factors, scale, config = read_adapter(Path(folder))
        modules = dict(self.model.named_modules())
        for layer, (a, b) in factors.items():
            module = modules.get(layer)
            wrapped = self.layers.get(layer)
            if wrapped is None:
                if not isinstance(module, nn.Linear):
                    raise ModelError(f"{folder}: the adapter names layer {layer!r}, not a linear layer of this model")
                wrapped = self.layers[layer] = BankedLinear(module, self)
                parent, _, child = layer.rpartition(".")
                setattr(self.model.get_submodule(parent), child, wrapped)
            base = wrapped.base.weight
            if a.shape[1] != base.shape[1] or b.shape[0] != base.shape[0]:
                raise ModelError(
                    f"{folder}: layer {layer} has factors {tuple(b.shape)}·{tuple(a.shape)}, "
                    f"the model's weight is {tuple(base.shape)}: an adapter of another model"
                )
        for layer, (a, b) in factors.items():
            device = self.layers[layer].base.weight.device
            self.layers[layer].factors[name] = Factors(a.to(device), b.to(device), scale)
        self.configs[name] = config

    @property
    def names(self) -> list[str]:
        return list(self.configs)

    def remove(self, name: str) -> None:
        """Drop ``name``'s factors and merged weights (the wrappers stay: an empty one costs nothing)."""
        for wrapped in self.layers.values():
            wrapped.factors.pop(name, None)
        self._merged.pop(name, None)
        if self._stacked is not None and name in self._stacked[0]:
            self._stacked = None
        del self.configs[name]

    @contextlib.contextmanager
    def use(self, name: str | None, merge: bool = False) -> Iterator[None]:
        """Every row with adapter ``name`` (None: the base model); ``merge``: its merged weights,
        when the bank keeps merged copies."""
        if name is None:
            yield
            return
        if not (merge and self.max_merged):
            self.active = name
            try:
                yield
            finally:
                self.active = None
            return
        weights = self._merged_weights(name)
        originals = {}
        for layer, weight in weights.items():
            linear = self.layers[layer].base
            originals[layer] = linear.weight
            linear.weight = weight
        try:
            yield
        finally:
            for layer, weight in originals.items():
                self.layers[layer].base.weight = weight

    @contextlib.contextmanager
    def use_rows(self, names: list[str | None]) -> Iterator[None]:
        """Row ``i`` with adapter ``names[i]`` (None: the base model), for one batch of ``len(names)``.

        The factors of the adapters in the batch are stacked: ``A`` of every layer of a group
        (:class:`SharedInput`) and adapter in one product, a mask keeping each row's own blocks,
        and each layer's weight extended with its stacked ``B`` columns, so the base product and the
        adapters' are one matrix product. The stacks are kept for the next batch of the same
        adapters (one more copy of the adapted layers' weights)."""
        distinct = tuple(sorted({n for n in names if n is not None}))
        stacks = self._stacks(distinct)
        for (a, blocks), layers in stacks:
            mask = torch.zeros(len(names), 1, a.shape[0], dtype=a.dtype, device=a.device)
            for (start, end), name in blocks:
                for row, wanted in enumerate(names):
                    if wanted == name:
                        mask[row, 0, start:end] = 1
            shared = SharedInput(a, mask)
            for wrapped, part, extended in layers:
                wrapped.rows = (shared, part, extended)
        try:
            yield
        finally:
            for wrapped in self.layers.values():
                wrapped.rows = None

    @torch.no_grad()
    def _stacks(self, distinct: tuple[str, ...]) -> list:
        """Per group of layers: its stacked ``A``, each block's adapter, and per layer its slice and ``[W | B]``."""
        if self._stacked is not None and self._stacked[0] == distinct:
            return self._stacked[1]
        self._stacked = None  # the old stacks' memory goes before the new ones are built
        groups: dict[tuple[str, int], list[tuple[BankedLinear, list[str]]]] = {}
        for layer, wrapped in self.layers.items():
            present = [n for n in distinct if n in wrapped.factors]
            if present:
                groups.setdefault((layer.rpartition(".")[0], wrapped.base.in_features), []).append((wrapped, present))
        stacks = []
        for members in groups.values():
            weight = members[0][0].base.weight
            parts, blocks, layers, start = [], [], [], 0
            for wrapped, present in members:
                first = start
                for name in present:
                    f = wrapped.factors[name]
                    parts.append(f.a)
                    blocks.append(((start, start + f.a.shape[0]), name))
                    start += f.a.shape[0]
                b = torch.cat([wrapped.factors[n].b * wrapped.factors[n].scale for n in present], dim=1)
                w = wrapped.base.weight
                extended = torch.cat([w, b.to(device=w.device, dtype=w.dtype)], dim=1)
                layers.append((wrapped, slice(first, start), extended))
            a = torch.cat(parts).to(device=weight.device, dtype=weight.dtype)
            stacks.append(((a, blocks), layers))
        self._stacked = (distinct, stacks)
        return stacks

    @torch.no_grad()
    def _merged_weights(self, name: str) -> dict[str, torch.Tensor]:
        if name in self._merged:
            self._merged.move_to_end(name)
            return self._merged[name]
        while len(self._merged) >= self.max_merged:
            self._merged.popitem(last=False)
        weights = {}
        for layer, wrapped in self.layers.items():
            f = wrapped.factors.get(name)
            if f is None:
                continue
            base = wrapped.base.weight
            delta = (f.b @ f.a) * f.scale
            weights[layer] = nn.Parameter((base.float() + delta).to(base.dtype).contiguous(), requires_grad=False)
        self._merged[name] = weights
        return weights
