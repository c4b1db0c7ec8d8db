"""Agent episodes against the simulated environment, batched turn by turn.

An agent (any view: the teacher with the prompt, a student without it) acts, the environment
persona (:func:`genpi.prompt.views.environment_conversation`) answers. Every turn, all open
episodes advance together: one generate call for the agents, one for the environments. An
episode ends when the environment answers with the end token, when a context is full, on an
empty reply, or after ``limit`` agent turns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from genpi.engines.base import Conversation, Generation, SamplingParams
from genpi.prompt.spec import PromptSpec
from genpi.prompt.views import environment_conversation, environment_opening

END_TOKEN, MAX_TURNS, CONTEXT, EMPTY = "end_token", "max_turns", "context", "empty_reply"

Generate = Callable[[list[Conversation], SamplingParams], list[Generation]]


@dataclass(frozen=True)
class Resampling:
    """Agent turns that ``accept`` rejects are sampled again with ``params`` (temperature > 0):
    ``tries`` samples per rejected turn, all drawn in one call (identical requests get their own
    seeds), and the first accepted one, in draw order, replaces the turn before the environment
    answers. Only the first ``turns`` agent turns of an episode are resampled; rejected turns
    with no accepted sample stay.
    """

    tries: int
    params: SamplingParams
    accept: Callable[[str], bool]
    turns: int = 1


def _resample(
    views: list[Conversation], replies: list[Generation], generate: Generate, resampling: Resampling
) -> tuple[list[Generation], set[int]]:
    """``replies`` with rejected ones replaced where a sample was accepted; the replaced positions."""

    def rejected(gen: Generation) -> bool:
        return gen.finish_reason != CONTEXT and not (gen.text.strip() and resampling.accept(gen.text))

    out, replaced = list(replies), set()
    # Every try at once: one call keeps the engine's batch full, where rounds of the still-rejected
    # turns would shrink to a few conversations each (measured: a round of 1-3 took as long as 28).
    asked = [k for k, gen in enumerate(replies) if rejected(gen) for _ in range(resampling.tries)]
    if asked:
        for k, gen in zip(asked, generate([views[k] for k in asked], resampling.params)):
            if k not in replaced and not rejected(gen):
                out[k] = gen
                replaced.add(k)
    return out, replaced


def _stopped(gen: Generation) -> str:
    """CONTEXT or EMPTY (blank text) when a generation ends its episode, else ""."""
    if gen.finish_reason == CONTEXT:
        return CONTEXT
    return "" if gen.text.strip() else EMPTY


def play_episodes(
    spec: PromptSpec,
    real_inputs: list[str],
    agent_views: list[Conversation],
    agent_generate: Generate,
    env_generate: Generate,
    limit: int,
    agent_params: SamplingParams,
    env_params: SamplingParams,
    last_observation: bool = True,
    first_turns: list[Generation | None] | None = None,
    resampling: Resampling | None = None,
) -> list[dict]:
    """One episode per input, the agent starting from its opening conversation in ``agent_views``.

    Returns ``{"turns": [{"agent", "observation", "agent_finish"}...], "end"}`` per input, in
    order; the last turn's observation is empty when the episode ended there. ``agent_views``
    are not modified. ``last_observation=False`` skips the environment's answer to the agent's
    ``limit``-th turn (no agent reads it; such episodes end as MAX_TURNS, even if that answer
    would have been the end token). ``first_turns``: the agents' first replies, already generated
    elsewhere with the same view and settings (greedy single-turn outputs); they are not asked again
    (a None entry: that agent's first reply is generated here).
    ``resampling`` (synthesis only: evaluation scores what a system says greedily) replaces agent
    turns it rejects by accepted samples; such turns are marked ``"resampled": True``.
    """
    agents = [list(view) for view in agent_views]
    envs = [environment_conversation(spec) for _ in real_inputs]
    turns: list[list[dict]] = [[] for _ in real_inputs]
    ends = [""] * len(real_inputs)
    for turn in range(limit):
        open_ids = [i for i, end in enumerate(ends) if not end]
        if not open_ids:
            break
        given = first_turns if turn == 0 and first_turns is not None else [None] * len(real_inputs)
        asked = [i for i in open_ids if given[i] is None]
        made = dict(zip(asked, agent_generate([agents[i] for i in asked], agent_params))) if asked else {}
        replies = [made[i] if given[i] is None else given[i] for i in open_ids]
        replaced: set[int] = set()
        if resampling is not None and turn < resampling.turns:
            replies, replaced = _resample([agents[i] for i in open_ids], replies, agent_generate, resampling)
        for k, (i, gen) in enumerate(zip(open_ids, replies)):
            ends[i] = _stopped(gen)
            if ends[i]:
                continue
            agents[i].append({"role": "assistant", "content": gen.text})
            said = environment_opening(real_inputs[i], gen.text) if turn == 0 else gen.text
            envs[i].append({"role": "user", "content": said})
            turns[i].append({"agent": gen.text, "observation": "", "agent_finish": gen.finish_reason})
            if k in replaced:
                turns[i][-1]["resampled"] = True
        open_ids = [i for i in open_ids if not ends[i]]
        if not open_ids or (turn == limit - 1 and not last_observation):
            break
        for i, gen in zip(open_ids, env_generate([envs[i] for i in open_ids], env_params)):
            if gen.stop_string or gen.text.strip() == spec.environment.end_token:
                ends[i] = END_TOKEN
                continue
            ends[i] = _stopped(gen)
            if ends[i]:
                continue
            envs[i].append({"role": "assistant", "content": gen.text})
            agents[i].append({"role": "user", "content": gen.text})
            turns[i][-1]["observation"] = gen.text
    return [{"turns": t, "end": end or MAX_TURNS} for t, end in zip(turns, ends)]
