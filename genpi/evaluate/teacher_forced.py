"""Teacher-forced fidelity: how likely each system finds the teacher's own replies.

For every agent turn the teacher wrote, the same reply tokens are scored in three contexts:
the teacher's (prompt present, no adapter), the base model's and the adapter's (no prompt).
Reported per turn: the mean per-token NLL of the reply under each system, and the KL from the
teacher's next-token distribution to each student's, over the teacher's top-k tokens plus one
tail bucket holding the rest of the probability mass (a proper KL over k + 1 outcomes: zero
exactly when both put the same mass on those tokens and on the tail).

Scoring is batched two ways. A turn's context and reply open the next turn's context, so the
replies of one episode are read off one forward over its longest turn (a causal model's logits at
a position see only the tokens before it); and those rows run several at a time, right-padded,
over one copy of the prompt's KV (web-shop-agent's 48 test turns on 2 cores, bf16: 31 s one reply
at a time, 11-18 s so; docs/log.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from genpi.chat import Conversation, chat_ids, shared_opening
from genpi.divergence import topk_tail_kl

_ROW_TOKENS = 4096  # new tokens per scoring forward (rows × width): bounds the logits' memory


@dataclass
class ReplyScore:
    """Per-token sums over one reply's tokens (divide by ``tokens`` for means)."""

    tokens: int
    nll_sum: float
    kl_sum: float


@dataclass
class _Row:
    """One sequence run through the model, and the replies read off it: (reply index, the
    position of its first token, its token count)."""

    ids: list[int]
    spans: list[tuple[int, int, int]] = field(default_factory=list)


def reply_ids(tokenizer: Any, context: Conversation, reply: str) -> list[int]:
    """The tokens of ``reply`` as the assistant's turn after ``context``, end of turn included."""
    head = chat_ids(tokenizer, context, generation_prompt=True)
    full = chat_ids(tokenizer, [*context, {"role": "assistant", "content": reply}], generation_prompt=False)
    if full[: len(head)] != head:
        raise ValueError("the chat template does not render the reply after its context")
    return full[len(head) :]


def _rows(contexts: dict[int, list[int]], targets: list[list[int]]) -> list[_Row]:
    """Each reply (context then reply tokens) in the row of a longer sequence that starts with it
    (an episode's later turn), else in a row of its own; rows by length."""
    rows: list[_Row] = []
    for i in sorted(contexts, key=lambda i: -(len(contexts[i]) + len(targets[i]))):
        ids = contexts[i] + targets[i]
        home = next((r for r in rows if r.ids[: len(ids)] == ids), None)
        if home is None:
            home = _Row(ids)
            rows.append(home)
        home.spans.append((i, len(contexts[i]), len(targets[i])))
    return sorted(rows, key=lambda r: len(r.ids))


def _batches(rows: list[_Row], cached: int) -> list[list[_Row]]:
    """Consecutive rows, as many per forward as fit ``_ROW_TOKENS`` padded new tokens."""
    batches: list[list[_Row]] = []
    for row in rows:  # by length: the last row of a batch is its widest
        if batches and (len(batches[-1]) + 1) * (len(row.ids) - cached) <= _ROW_TOKENS:
            batches[-1].append(row)
        else:
            batches.append([row])
    return batches


def _prefix_cache(model: Any, contexts: list[list[int]]) -> tuple[Any, int]:
    """A KV cache of the tokens every context starts with (the prompt), and their count."""
    from transformers.cache_utils import DynamicCache

    length = shared_opening(contexts)
    if not length:
        return None, 0
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([contexts[0][:length]], device=model.device), cache=cache, use_cache=True)
    return cache, length


def _logprobs(model: Any, rows: list[_Row], prefix: Any = None, cached: int = 0) -> dict[int, torch.Tensor]:
    """Log-softmax over the vocabulary at each position that predicts a reply token, per reply:
    ``{reply index: [tokens, vocab]}``, from one forward over ``rows`` (right-padded) after the
    ``cached`` tokens ``prefix`` holds (every row starts with them)."""
    from transformers.cache_utils import DynamicCache

    width = max(len(r.ids) for r in rows) - cached
    ids = torch.tensor([r.ids[cached:] + [0] * (width - len(r.ids) + cached) for r in rows], device=model.device)
    mask = torch.tensor([[1] * len(r.ids) + [0] * (width - len(r.ids) + cached) for r in rows], device=model.device)
    past = None
    if prefix is not None:  # the prompt's KV, one copy viewed by every row
        past = DynamicCache(config=model.config)
        for index, layer in enumerate(prefix.layers):
            past.update(layer.keys.expand(len(rows), -1, -1, -1), layer.values.expand(len(rows), -1, -1, -1), index)
    # Logits only where a reply token is predicted (the position before it).
    keep = sorted(
        {p - cached for r in rows for _, start, count in r.spans for p in range(start - 1, start + count - 1)}
    )
    column = {p: k for k, p in enumerate(keep)}
    logits = model(
        input_ids=ids,
        attention_mask=mask,
        cache=past,
        use_cache=past is not None,
        logits_to_keep=torch.tensor(keep, device=model.device),
    ).logits
    out = {}
    for b, row in enumerate(rows):
        for i, start, count in row.spans:
            columns = [column[p - cached] for p in range(start - 1, start + count - 1)]
            out[i] = torch.log_softmax(logits[b, columns].float(), dim=-1)
    return out


def _nll(logprobs: torch.Tensor, target: list[int]) -> float:
    labels = torch.tensor(target, device=logprobs.device)[:, None]
    return float(-logprobs.gather(-1, labels).sum())


@torch.inference_mode()
def score_replies(
    engine: Any,
    teacher_contexts: list[Conversation],
    student_contexts: list[Conversation],
    replies: list[str],
    student_adapters: dict[str, str | None],
    top_k: int,
    share_prefix: bool = True,
) -> dict[str, list[ReplyScore]]:
    """Score each teacher reply under the teacher and every named student system.

    ``student_adapters`` maps a system name (``base``, ``adapter``) to the adapter that serves
    it (None for the base model). Returns one list of :class:`ReplyScore` per system, ``teacher``
    included (its KL to itself is 0 by construction). With ``share_prefix`` the teacher contexts'
    common opening (the prompt) is computed once, not once per row.
    """
    tokenizer = engine.tokenizer
    teacher_ids = {i: chat_ids(tokenizer, c, True) for i, c in enumerate(teacher_contexts)}
    targets = [reply_ids(tokenizer, c, r) for c, r in zip(teacher_contexts, replies)]
    scores: dict[str, list[Any]] = {name: [None] * len(replies) for name in ("teacher", *student_adapters)}
    with engine.adapter_scope(None) as model:
        prefix, cached = _prefix_cache(model, list(teacher_ids.values())) if share_prefix else (None, 0)
    # Teacher rows a batch at a time, each batch's replies then scored under every student: only
    # one batch's teacher distributions are held at once.
    for batch in _batches(_rows(teacher_ids, targets), cached):
        with engine.adapter_scope(None) as model:
            teacher = _logprobs(model, batch, prefix, cached)
        for i, logprobs in teacher.items():
            scores["teacher"][i] = ReplyScore(len(targets[i]), _nll(logprobs, targets[i]), 0.0)
        student_ids = {i: chat_ids(tokenizer, student_contexts[i], True) for i in teacher} if student_adapters else {}
        for name, adapter in student_adapters.items():
            with engine.adapter_scope(adapter) as model:
                for rows in _batches(_rows(student_ids, targets), 0):
                    for i, logprobs in _logprobs(model, rows).items():
                        kl = float(topk_tail_kl(teacher[i], logprobs, top_k).sum())
                        scores[name][i] = ReplyScore(len(targets[i]), _nll(logprobs, targets[i]), kl)
    return scores
