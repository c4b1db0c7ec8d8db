"""Decode attention over an opening every row of a batch shares, read once instead of once per row.

Batched conversations that carry the same long opening (the environment persona's worked
examples, a served prompt) used to hold a copy of its keys and values per row: every decoded
token then read ``rows x opening`` keys and values per layer, the largest cost of a decode step on
CPU (measured on SmolLM2-135M, 24 rows: 0.24 s a step with 1.8k tokens each, 0.11 s with 200).

:class:`SharedPrefixLayer` keeps the opening once (one row) and each row's own tokens after it.
:func:`shared_prefix_attention` (the model's attention function, registered under
:data:`ATTENTION`) attends a decoding query to the opening with one matrix product for all rows
and to each row's own tokens apart, and merges the two softmaxes exactly (log-sum-exp). Any other
call (a prefill of several tokens, a cache without a shared opening) runs transformers' SDPA
attention on the whole keys as before.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from genpi.engines.kv_cache import GrowingLayer

ATTENTION = "genpi_shared_prefix"


class SharedPrefixLayer(GrowingLayer):
    """A cache layer holding an opening's keys and values once, then each row's own."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.opening_keys, self.opening_values = keys, values  # (1, kv heads, opening, head dim)

    @property
    def opening(self) -> int:
        return self.opening_keys.shape[-2]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        keys.genpi_opening = (self.opening_keys, self.opening_values)  # read by shared_prefix_attention
        return keys, values

    def get_seq_length(self) -> int:
        return self.opening + super().get_seq_length()

    def row_kv(self, row: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row ``row``'s keys and values at ``positions`` (counted from the opening's first token)."""
        inside = positions[positions < self.opening]
        after = positions[positions >= self.opening] - self.opening
        own_k, own_v = super().row_kv(row, after)
        keys = torch.cat([self.opening_keys.index_select(2, inside), own_k], dim=2)
        values = torch.cat([self.opening_values.index_select(2, inside), own_v], dim=2)
        return keys, values


def shared_prefix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention that reads a :class:`SharedPrefixLayer`'s opening once for every row when decoding."""
    opening = getattr(key, "genpi_opening", None)
    if opening is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    opening_k, opening_v = opening
    rows, heads, q, dim = query.shape
    if q != 1 or dropout:  # a prefill: the whole keys, opening repeated per row, through SDPA
        full_k = torch.cat([opening_k.expand(rows, -1, -1, -1), key], dim=2)
        full_v = torch.cat([opening_v.expand(rows, -1, -1, -1), value], dim=2)
        return sdpa_attention_forward(module, query, full_k, full_v, attention_mask, dropout, scaling, **kwargs)
    kv_heads = key.shape[1]
    group = heads // kv_heads  # query head h reads kv head h // group, as repeat_kv lays them out
    scale = scaling if scaling is not None else dim**-0.5
    grouped = query.float().reshape(rows, kv_heads, group, dim)
    # The opening: every row's queries against one copy of its keys.
    flat = grouped.transpose(0, 1).reshape(kv_heads, rows * group, dim)
    s1 = torch.matmul(flat, opening_k[0].float().transpose(1, 2)) * scale  # (kv heads, rows * group, opening)
    m1 = s1.amax(-1, keepdim=True)
    p1 = torch.exp(s1 - m1)
    l1, o1 = p1.sum(-1, keepdim=True), torch.matmul(p1, opening_v[0].float())

    def by_row(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(kv_heads, rows, group, -1).transpose(0, 1)  # (rows, kv heads, group, ...)

    m1, l1, o1 = by_row(m1), by_row(l1), by_row(o1)
    # Each row's own tokens after it, with its padding masked.
    s2 = torch.matmul(grouped, key.float().transpose(-1, -2)) * scale  # (rows, kv heads, group, own)
    if attention_mask is not None:
        own = attention_mask[..., -key.shape[2] :].reshape(rows, 1, 1, -1)
        s2 = s2.masked_fill(~own, float("-inf")) if own.dtype == torch.bool else s2 + own.float()
    m2 = s2.amax(-1, keepdim=True)
    p2 = torch.exp(s2 - m2)
    l2, o2 = p2.sum(-1, keepdim=True), torch.matmul(p2, value.float())
    top = torch.maximum(m1, m2)
    w1, w2 = torch.exp(m1 - top), torch.exp(m2 - top)
    out = (o1 * w1 + o2 * w2) / (l1 * w1 + l2 * w2)  # (rows, kv heads, group, dim)
    return out.reshape(rows, heads, 1, dim).transpose(1, 2).to(query.dtype), None


AttentionInterface.register(ATTENTION, shared_prefix_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def use_shared_prefix_attention(model: Any) -> bool:
    """Run ``model``'s attention through :func:`shared_prefix_attention` where it uses SDPA
    (the same results on every cache without a shared opening); False where it does not."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    model.set_attn_implementation(ATTENTION)
    return True
