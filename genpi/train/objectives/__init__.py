"""Training objectives, one module each; :func:`genpi.train.trainer.step_loss` runs any of them.

- ``genpi``: the paper's joint loss, SFT on the role-played conversations plus λ · Prompt Generation;
- ``sft``: SFT on the role-played conversations only (the paper's ablation);
- ``prepend``: SFT where a share of the examples keep the prompt before them (the paper's
  prompt-prepending baselines, 100% and 50%);
- ``seqkd-kld``: SFT plus token-level KL to the teacher's distributions with the prompt (the
  paper's SeqKD+KLD baseline); the teacher is the base model (adapter disabled) with the prompt;
- ``onpolicy-kl``: after SFT warm-up steps, the adapter samples its own replies without the prompt
  and learns the reverse top-k KL to the same model with the prompt on them;
- ``genpi-kld``: ``genpi`` whose SFT term adds ``seqkd-kld``'s KL to the teacher.

An objective is one module whose class carries ``@register_objective("<method>")``, plus its import
below and its name in ``config.METHODS`` (a test checks the two agree).
"""

from __future__ import annotations

from genpi.config import TrainConfig

# One line per objective module: importing it registers its classes (register_objective).
from genpi.train.objectives import genpi, genpi_kld, onpolicy_kl, prepend, seqkd_kld  # noqa: E402,F401
from genpi.train.objectives.base import OBJECTIVES, Objective


def objective_for(cfg: TrainConfig) -> Objective:
    """The objective ``cfg.method`` names, configured by ``cfg``."""
    return OBJECTIVES[cfg.method](cfg)


__all__ = ["OBJECTIVES", "Objective", "objective_for"]
