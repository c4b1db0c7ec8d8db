"""Divergences between next-token distributions, shared by training (on-policy KL) and evaluation
(teacher-forced top-k KL)."""

from __future__ import annotations

import torch


def topk_tail_kl(p_logprobs: torch.Tensor, q_logprobs: torch.Tensor, k: int) -> torch.Tensor:
    """KL(p || q) per position over p's top-k tokens plus one tail bucket holding the rest of the
    mass: a proper KL over k + 1 outcomes, zero exactly when both put the same mass on them.
    Evaluation passes (teacher, student), forward KL; on-policy training (student, teacher),
    reverse KL on the student's own samples; gradients flow through either argument."""
    top, index = p_logprobs.topk(min(k, p_logprobs.shape[-1]), dim=-1)
    p = top.exp()
    q = q_logprobs.gather(-1, index).exp()
    p_tail = (1 - p.sum(-1)).clamp_min(0)
    q_tail = (1 - q.sum(-1)).clamp_min(0)
    tiny = torch.finfo(torch.float32).tiny
    kl = (p * (top - q.clamp_min(tiny).log())).sum(-1)
    tail = torch.where(
        p_tail > 0, p_tail * (p_tail.clamp_min(tiny).log() - q_tail.clamp_min(tiny).log()), torch.zeros_like(p_tail)
    )
    return (kl + tail).clamp_min(0)
