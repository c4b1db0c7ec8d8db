"""Decode attention over a shared opening held once equals attention over per-row copies."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from genpi.engines.base import SamplingParams
from genpi.engines.hf import HFEngine
from genpi.engines.shared_prefix import SharedPrefixLayer, shared_prefix_attention
from genpi.models import TINY

ROWS, KV_HEADS, GROUP, DIM, OPENING, OWN = 3, 2, 3, 8, 5, 4


def _mask(queries: int) -> torch.Tensor:
    """(rows, 1, queries, opening + own): every row sees the opening; row 1's first two own
    positions are padding; the queries are the last ``queries`` positions, causal among themselves."""
    width = OPENING + OWN
    mask = torch.ones(ROWS, 1, queries, width, dtype=torch.bool)
    mask[1, :, :, OPENING : OPENING + 2] = False
    for q in range(queries):
        mask[:, :, q, width - queries + q + 1 :] = False
    return mask


def test_shared_opening_attention_equals_attention_over_per_row_copies() -> None:
    torch.manual_seed(0)
    module = SimpleNamespace(num_key_value_groups=GROUP, is_causal=True)
    opening_k, opening_v = torch.randn(1, KV_HEADS, OPENING, DIM), torch.randn(1, KV_HEADS, OPENING, DIM)
    own_k, own_v = torch.randn(ROWS, KV_HEADS, OWN, DIM), torch.randn(ROWS, KV_HEADS, OWN, DIM)
    full_k = torch.cat([opening_k.expand(ROWS, -1, -1, -1), own_k], dim=2)
    full_v = torch.cat([opening_v.expand(ROWS, -1, -1, -1), own_v], dim=2)
    for queries in (1, 3):  # a decode step (the opening read once), a prefill (whole keys)
        query = torch.randn(ROWS, KV_HEADS * GROUP, queries, DIM)
        layer = SharedPrefixLayer(opening_k, opening_v)
        keys, values = layer.update(own_k, own_v)
        assert layer.get_seq_length() == OPENING + OWN
        got, _ = shared_prefix_attention(module, query, keys, values, _mask(queries), scaling=DIM**-0.5)
        want, _ = sdpa_attention_forward(module, query, full_k, full_v, _mask(queries), scaling=DIM**-0.5)
        assert got.shape == want.shape == (ROWS, queries, KV_HEADS * GROUP, DIM)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        positions = torch.tensor([0, 4, 5, 8])  # two in the opening, two of the row's own
        k, v = layer.row_kv(2, positions)
        torch.testing.assert_close(k, full_k[2:3].index_select(2, positions))
        torch.testing.assert_close(v, full_v[2:3].index_select(2, positions))


def test_conversations_sharing_an_opening_hold_it_once_across_calls() -> None:
    """The second call of conversations that share a long opening continues from their kept KV
    with that opening held once, and replies as an engine holding a copy per row (float32)."""
    opening = [{"role": "system", "content": "You simulate a Linux shell. Reply with the output. " * 10}]
    chats = [opening + [{"role": "user", "content": q}] for q in ("ls /tmp", "uname -r", "who", "date")]
    params = SamplingParams(max_new_tokens=8)
    once = HFEngine(TINY, dtype="float32", batch_size=4)
    per_row = HFEngine(TINY, dtype="float32", batch_size=4)
    per_row._opening_once = False
    assert once._opening_once
    for turn in range(2):
        if turn:
            once._tags = [None] * len(chats)
            kept = once._kept_turns([once.encode(c) for c in chats], once.turn_cache)
            assert kept is not None and kept[2] > 100  # the opening, held once
            assert isinstance(kept[3].layers[0], SharedPrefixLayer)
        replies = [g.text for g in once.generate(chats, params)]
        assert replies == [g.text for g in per_row.generate(chats, params)]
        chats = [
            c + [{"role": "assistant", "content": r}, {"role": "user", "content": "next"}]
            for c, r in zip(chats, replies)
        ]
