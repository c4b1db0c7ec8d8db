"""Outputs and role play on the real tiny model."""

from __future__ import annotations

import dataclasses

import pytest

from genpi.config import SynthConfig
from genpi.prompt.episodes import CONTEXT, EMPTY, END_TOKEN, MAX_TURNS
from genpi.synth.outputs import single_turn_outputs
from genpi.synth.roleplay import role_play
from tests.fakes import mini_spec

SPEC = mini_spec()


def synth_cfg(**changes) -> SynthConfig:
    return dataclasses.replace(SynthConfig(), **changes)


# ------------------------------------------------------------------ on the real tiny model


class Recording:
    """Wraps a real engine and counts its generate calls."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def generate(self, conversations, params):
        self.calls.append((len(conversations), params))
        return self.engine.generate(conversations, params)

    def count_tokens(self, conversations):
        return self.engine.count_tokens(conversations)


@pytest.fixture(scope="module")
def tiny_engine():
    from genpi.engines.hf import HFEngine

    return HFEngine("tiny-random-llama", batch_size=4)


@pytest.mark.timeout(120)
def test_outputs_and_role_play_on_the_tiny_model(tiny_engine) -> None:
    target = Recording(tiny_engine)
    cfg = synth_cfg(output_max_tokens=8, agent_max_tokens=8, env_max_tokens=8, max_turns=2, agent_resamples=0)
    inputs = [{"id": 0, "input": "Count the files in /tmp."}, {"id": 1, "input": "Print the kernel version."}]
    outputs = single_turn_outputs(SPEC, cfg, target, inputs)
    assert [o["id"] for o in outputs] == [0, 1] and target.calls[0][0] == 4
    assert all(o["teacher_prompt_tokens"] > o["student_prompt_tokens"] for o in outputs)
    assert all(o["student_finish"] in ("stop", "length") for o in outputs)

    first = role_play(SPEC, cfg, target, inputs)
    again = role_play(SPEC, cfg, target, inputs)
    assert first == again  # greedy: reproducible
    runs = target.calls[1:]
    assert len(runs) % 2 == 0 and runs[: len(runs) // 2] == runs[len(runs) // 2 :]
    per_run = runs[: len(runs) // 2]
    assert 1 <= len(per_run) <= 2 * 2  # at most one agent and one environment call per turn
    assert per_run[0][0] == 2 and all(n <= 2 for n, _ in per_run)  # both conversations in one call
    assert [p.stop for _, p in per_run[1::2]] == [("<END>",)] * len(per_run[1::2])
    for r in first:
        assert 0 <= len(r["turns"]) <= 2 and r["end"] in (END_TOKEN, MAX_TURNS, CONTEXT, EMPTY)
        assert all(t["agent"] for t in r["turns"])
        if r["end"] == MAX_TURNS:
            assert len(r["turns"]) == 2
    # the random model never writes the action format: every turn is resampled, reproducibly
    resampling = dataclasses.replace(cfg, agent_resamples=2)
    sampled = role_play(SPEC, resampling, tiny_engine, inputs)
    assert sampled == role_play(SPEC, resampling, tiny_engine, inputs)
