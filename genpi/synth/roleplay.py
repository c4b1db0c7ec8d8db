"""Self Role-Playing Conversations: the target plays the agent with the prompt and the environment.

The agent sees the prompt with the input appended (the teacher view); the episodes are played
by :func:`genpi.prompt.episodes.play_episodes`, every open conversation of a part advancing together.
"""

from __future__ import annotations

from collections.abc import Sequence

from genpi.config import SynthConfig
from genpi.engines.base import Generation, SamplingParams
from genpi.prompt.episodes import Resampling, play_episodes
from genpi.prompt.spec import PromptSpec
from genpi.prompt.views import teacher_messages


def max_turns_for(spec: PromptSpec, cfg: SynthConfig) -> int:
    """The prompt's own limit, capped by the config's when it sets one."""
    return min(spec.max_turns, cfg.max_turns) if cfg.max_turns else spec.max_turns


def role_play(spec: PromptSpec, cfg: SynthConfig, target, inputs: Sequence[dict]) -> list[dict]:
    """For each ``{"id", "input"}``: the agent's turns and the environment's observations.

    Returns ``{"id", "turns": [{"agent", "observation", "agent_finish"}...], "end"}``; the last
    turn's observation is empty: the environment does not answer the agent's last turn, which
    nothing reads (training and evaluation leave it out), so an episode that ends at the turn
    limit ends as ``max_turns`` even where that answer would have been the end token. When the
    inputs carry the teacher's single-turn output (``teacher``, ``teacher_finish``) and it was
    generated with the agent's token limit, it is the agent's first turn (same view, greedy): it
    is not generated again.
    Agent turns out of the prompt's action format are resampled (``synth.agent_resamples``).
    """
    # Every request draws from its own seed (the call's and its tokens: engines.base.request_seeds),
    # so the call's seed needs no part offset, and a record's role play does not depend on which
    # others share its part (the test split's records are left out of it).
    seed = cfg.seed
    agent_params = SamplingParams(max_new_tokens=cfg.agent_max_tokens, temperature=0.0, seed=seed)
    env_params = SamplingParams(
        max_new_tokens=cfg.env_max_tokens, temperature=0.0, seed=seed, stop=(spec.environment.end_token,)
    )
    texts = [r["input"] for r in inputs]
    first = None
    if cfg.output_max_tokens == cfg.agent_max_tokens and all("teacher" in r for r in inputs):
        first = [Generation(r["teacher"], r["teacher_finish"], 0, 0) for r in inputs]
    resampling = None
    if cfg.agent_resamples and spec.action_format.has_actions:
        resampling = Resampling(
            cfg.agent_resamples,
            SamplingParams(max_new_tokens=cfg.agent_max_tokens, temperature=cfg.resample_temperature, seed=seed + 1),
            spec.action_format.is_action,
            cfg.resample_turns,
        )
    episodes = play_episodes(
        spec,
        texts,
        [teacher_messages(spec, x) for x in texts],
        target.generate,
        target.generate,
        max_turns_for(spec, cfg),
        agent_params,
        env_params,
        last_observation=False,
        first_turns=first,
        resampling=resampling,
    )
    return [{"id": r["id"], **episode} for r, episode in zip(inputs, episodes)]
