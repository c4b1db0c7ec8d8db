"""Teacher-forced fidelity: how likely each system finds the teacher's own replies.

For every agent turn the teacher wrote, the same reply tokens are scored in three contexts:
the teacher's (prompt present, no adapter), the base model's and the adapter's (no prompt).
Reported per turn: the mean per-token NLL of the reply under each system, and the KL from the
teacher's next-token distribution to each student's, over the teacher's top-k tokens plus one
tail bucket holding the rest of the probability mass (a proper KL over k + 1 outcomes: zero
exactly when both put the same mass on those tokens and on the tail).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from genpi.chat import Conversation, chat_ids, common_prefix
from genpi.divergence import topk_tail_kl


@dataclass
class ReplyScore:
    """Per-token sums over one reply's tokens (divide by ``tokens`` for means)."""

    tokens: int
    nll_sum: float
    kl_sum: float


def reply_ids(tokenizer: Any, context: Conversation, reply: str) -> list[int]:
    """The tokens of ``reply`` as the assistant's turn after ``context``, end of turn included."""
    head = chat_ids(tokenizer, context, generation_prompt=True)
    full = chat_ids(tokenizer, [*context, {"role": "assistant", "content": reply}], generation_prompt=False)
    if full[: len(head)] != head:
        raise ValueError("the chat template does not render the reply after its context")
    return full[len(head) :]


def _reply_logprobs(
    model: Any, context_ids: list[int], reply: list[int], cache: Any = None, cached: int = 0
) -> torch.Tensor:
    """Log-softmax over the vocabulary at each position that predicts a reply token: [len(reply), vocab].

    With ``cache`` holding the KV of the first ``cached`` context tokens, only the rest is computed,
    and the cache is cut back to those tokens afterwards.
    """
    ids = torch.tensor([(context_ids + reply)[cached:]], device=model.device)
    logits = model(
        input_ids=ids, past_key_values=cache, use_cache=cache is not None, logits_to_keep=len(reply) + 1
    ).logits[0, :-1]
    if cache is not None:
        cache.crop(cached - cache.get_seq_length())  # a negative count: tokens to drop from the end
    return torch.log_softmax(logits.float(), dim=-1)


def _prefix_cache(model: Any, contexts: list[list[int]]) -> tuple[Any, int]:
    """A KV cache of the tokens every context starts with (the prompt), and their count."""
    from transformers.cache_utils import DynamicCache

    if len(contexts) < 2:
        return None, 0
    shortest = min(len(c) for c in contexts)
    length = min(common_prefix(contexts), shortest - 1)  # keep a token of each context to compute
    if length < 32:
        return None, 0
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([contexts[0][:length]], device=model.device), past_key_values=cache, use_cache=True)
    return cache, length


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
    common opening (the prompt) is computed once, not once per reply.
    """
    tokenizer = engine.tokenizer
    scores: dict[str, list[ReplyScore]] = {"teacher": [], **{name: [] for name in student_adapters}}
    teacher_ids = [chat_ids(tokenizer, c, True) for c in teacher_contexts]
    with engine.adapter_scope(None) as model:
        cache, cached = _prefix_cache(model, teacher_ids) if share_prefix else (None, 0)
    for teacher_ctx, context_ids, student_ctx, reply in zip(teacher_contexts, teacher_ids, student_contexts, replies):
        target = reply_ids(tokenizer, teacher_ctx, reply)
        labels = torch.tensor(target)
        with engine.adapter_scope(None) as model:
            teacher = _reply_logprobs(model, context_ids, target, cache, cached)
        nll = -teacher.gather(-1, labels[:, None].to(teacher.device)).squeeze(-1)
        scores["teacher"].append(ReplyScore(len(target), float(nll.sum()), 0.0))
        student_ids = chat_ids(tokenizer, student_ctx, True)
        for name, adapter in student_adapters.items():
            with engine.adapter_scope(adapter) as model:
                student = _reply_logprobs(model, student_ids, target)
            nll = -student.gather(-1, labels[:, None].to(student.device)).squeeze(-1)
            kl = topk_tail_kl(teacher, student, top_k)
            scores[name].append(ReplyScore(len(target), float(nll.sum()), float(kl.sum())))
    return scores
