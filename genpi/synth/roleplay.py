"""Self Role-Playing Conversations, batched turn by turn.

The target model plays the agent (it sees the prompt, the input appended to its last user
turn) and, with the roles of the prompt's worked examples swapped, the environment. Every
turn, all open conversations of a part advance together: one generate call for the agents,
one for the environments. A conversation ends when the environment answers with the end
token, when the model's context is full, or after ``max_turns`` agent turns.
"""

from __future__ import annotations

from typing import Sequence

from genpi.config import SynthConfig
from genpi.engines.base import Conversation, SamplingParams
from genpi.prompts import PromptSpec
from genpi.synth import templates

END_TOKEN, MAX_TURNS, CONTEXT, EMPTY = "end_token", "max_turns", "context", "empty_reply"


def max_turns_for(spec: PromptSpec, cfg: SynthConfig) -> int:
    """The prompt's own limit, capped by the config's when it sets one."""
    return min(spec.max_turns, cfg.max_turns) if cfg.max_turns else spec.max_turns


def role_play(spec: PromptSpec, cfg: SynthConfig, target, inputs: Sequence[dict]) -> list[dict]:
    """For each ``{"id", "input"}``: the agent's turns and the environment's observations.

    Returns ``{"id", "turns": [{"agent", "observation"}...], "end", "agent_finish"}``; the last
    turn's observation is empty when the episode ended there.
    """
    seed = cfg.seed + (inputs[0]["id"] if inputs else 0)
    agent_params = SamplingParams(max_new_tokens=cfg.agent_max_tokens, temperature=0.0, seed=seed)
    env_params = SamplingParams(max_new_tokens=cfg.env_max_tokens, temperature=0.0, seed=seed,
                                stop=(spec.environment.end_token,))
    agents: list[Conversation] = [spec.messages_with_input(r["input"]) for r in inputs]
    envs: list[Conversation] = [templates.environment_conversation(spec) for _ in inputs]
    turns: list[list[dict]] = [[] for _ in inputs]
    ends: list[str] = [""] * len(inputs)
    limit = max_turns_for(spec, cfg)
    for turn in range(limit):
        open_ids = [i for i, end in enumerate(ends) if not end]
        if not open_ids:
            break
        for i, gen in zip(open_ids, target.generate([agents[i] for i in open_ids], agent_params)):
            if gen.finish_reason == CONTEXT or not gen.text:
                ends[i] = CONTEXT if gen.finish_reason == CONTEXT else EMPTY
                continue
            agents[i].append({"role": "assistant", "content": gen.text})
            said = templates.environment_opening(inputs[i]["input"], gen.text) if turn == 0 else gen.text
            envs[i].append({"role": "user", "content": said})
            turns[i].append({"agent": gen.text, "observation": "", "agent_finish": gen.finish_reason})
        open_ids = [i for i in open_ids if not ends[i]]
        for i, gen in zip(open_ids, target.generate([envs[i] for i in open_ids], env_params)):
            if gen.stop_string or gen.text.strip() == spec.environment.end_token:
                ends[i] = END_TOKEN
            elif gen.finish_reason == CONTEXT or not gen.text:
                ends[i] = CONTEXT if gen.finish_reason == CONTEXT else EMPTY
            else:
                envs[i].append({"role": "assistant", "content": gen.text})
                agents[i].append({"role": "user", "content": gen.text})
                turns[i][-1]["observation"] = gen.text
    return [{"id": r["id"], "turns": t, "end": end or MAX_TURNS} for r, t, end in zip(inputs, turns, ends)]


def student_messages(user_input: str, turns: list[dict]) -> Conversation:
    """The conversation as the student sees it in training: the input alone, no prompt."""
    messages: Conversation = [{"role": "user", "content": user_input}]
    for k, turn in enumerate(turns):
        messages.append({"role": "assistant", "content": turn["agent"]})
        if turn["observation"] and k + 1 < len(turns):
            messages.append({"role": "user", "content": turn["observation"]})
    return messages
