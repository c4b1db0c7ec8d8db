"""Each conversation's KV cache, kept between generate calls of the hf backend.

A role-played conversation comes back every turn with two more messages; without this cache the
engine prefills its whole history again, a cost that grows with the square of the turns. After a
call, each conversation's keys and values (its real tokens only, padding dropped) are kept with
the token ids they were computed from: the request and the reply generated to it. The next call
reuses an entry only for a later turn of the same conversation, a request that starts with the
entry's whole request and goes on; within that, the longest common token prefix. Position ``j``
of an entry was computed from ``ids[:j + 1]``, so any common prefix is valid, whatever
re-tokenization does to the reply at the turn boundary. A request repeated unchanged is never
served from the cache, so asking the same thing twice gives the same answer.

Keys and values depend on the weights, so an entry is tagged with the adapter that computed it
(None: the base model) and only matches requests under the same adapter. The cache holds at
most ``max_bytes`` for all of them; the least recently used entries go first. A pinned entry (a
served prompt's KV, :meth:`TurnCache.pin`) is neither evicted nor superseded: every conversation
that opens with it continues from it, until it is unpinned.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from itertools import count

import numpy as np
import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values of shape (1, heads, tokens, dim)


@dataclass
class TurnEntry:
    ids: np.ndarray  # the request's tokens, then the reply's
    request: int  # how many of ids were the request
    tag: str | None  # the adapter that computed it
    kv: KV
    nbytes: int


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two token arrays."""
    n = min(len(a), len(b))
    same = a[:n] == b[:n]
    return n if same.all() else int(np.argmin(same))


class TurnCache:
    """Conversations' KV caches between calls, matched by longest common token prefix."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[int, TurnEntry] = OrderedDict()
        self.nbytes = 0
        self.pinned: set[int] = set()
        self._keys = count()

    def match(self, ids: list[int], tag: str | None = None) -> tuple[int | None, int]:
        """The key of the entry (under adapter ``tag``) that ``ids`` is a later turn of, and the
        length of their common prefix."""
        query = np.asarray(ids, dtype=np.int64)
        best, length = None, 0
        for key, entry in self.entries.items():
            if entry.tag != tag or len(query) <= entry.request:
                continue
            shared = common_prefix(query, entry.ids)
            if shared >= entry.request and shared > length:
                best, length = key, shared
        if best is not None:
            self.entries.move_to_end(best)
        return best, length

    def kv(self, key: int) -> KV:
        return self.entries[key].kv

    def put(
        self, request: list[int], reply: list[int], kv: KV, continued: int | None = None, tag: str | None = None
    ) -> None:
        """Keep ``kv`` (one row, one position per token of ``request + reply``). The entry this
        conversation ``continued`` is superseded."""
        if continued is not None and continued in self.entries and continued not in self.pinned:
            self.nbytes -= self.entries.pop(continued).nbytes
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
        if nbytes > self.max_bytes:
            return
        ids = np.asarray(request + reply, dtype=np.int64)
        self.entries[next(self._keys)] = TurnEntry(ids, len(request), tag, kv, nbytes)
        self.nbytes += nbytes
        self._evict()

    def pin(self, ids: list[int], kv: KV, tag: str | None = None) -> int:
        """Keep ``kv`` of ``ids`` until :meth:`unpin`; every longer request that starts with ``ids`` matches it."""
        key = next(self._keys)
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
        self.entries[key] = TurnEntry(np.asarray(ids, dtype=np.int64), len(ids), tag, kv, nbytes)
        self.nbytes += nbytes
        self.pinned.add(key)
        self._evict()
        return key

    def unpin(self, key: int) -> None:
        self.pinned.discard(key)
        if key in self.entries:
            self.nbytes -= self.entries.pop(key).nbytes

    def drop_tag(self, tag: str) -> None:
        """Forget every entry computed under adapter ``tag`` (the adapter was removed)."""
        for key in [k for k, e in self.entries.items() if e.tag == tag]:
            self.unpin(key)

    def _evict(self) -> None:
        for key in [k for k in self.entries if k not in self.pinned]:
            if self.nbytes <= self.max_bytes:
                break
            self.nbytes -= self.entries.pop(key).nbytes
