"""Single-turn student and teacher outputs, and reasons."""

from __future__ import annotations

import dataclasses

from genpi.config import SynthConfig
from genpi.prompt.views import teacher_messages
from genpi.synth.outputs import single_turn_outputs
from genpi.synth.reasons import reasons
from tests.fakes import FakeEngine, World, kind_of, mini_spec

SPEC = mini_spec()


def synth_cfg(**changes) -> SynthConfig:
    return dataclasses.replace(SynthConfig(), **changes)


# ------------------------------------------------------------------ single-turn outputs and reasons


def test_single_turn_outputs_student_has_no_prompt_teacher_has_it() -> None:
    def reply(conv, params):
        return ("S:" if kind_of(conv) == "student" else "T:") + conv[-1]["content"].rsplit("\n\n", 1)[-1]

    target = FakeEngine(reply)
    inputs = [{"id": 7, "input": "Count the lines of /etc/hosts"}, {"id": 9, "input": "Show the date and time"}]
    cfg = synth_cfg(output_max_tokens=77, seed=4)
    rows = single_turn_outputs(SPEC, cfg, target, inputs)
    assert len(target.calls) == 1  # one batched call for students and teachers
    convs, params = target.calls[0]
    assert convs[:2] == [[{"role": "user", "content": x["input"]}] for x in inputs]
    assert convs[2:] == [teacher_messages(SPEC, x["input"]) for x in inputs]
    assert SPEC.turns[0].content in convs[2][0]["content"]
    assert params.temperature == 0.0 and params.max_new_tokens == 77
    assert [r["id"] for r in rows] == [7, 9]
    assert rows[0]["student"] == "S:Count the lines of /etc/hosts"
    assert rows[0]["teacher"] == "T:Count the lines of /etc/hosts"
    assert rows[1]["student"] == "S:Show the date and time" and rows[1]["teacher"] == "T:Show the date and time"
    assert rows[0]["student_finish"] == "stop" and rows[0]["teacher_prompt_tokens"] > rows[0]["student_prompt_tokens"]


def test_reasons_use_generator_with_reason_sampling() -> None:
    gen = FakeEngine(World(SPEC))
    cfg = synth_cfg(reason_temperature=0.65, reason_top_p=0.8, reason_max_tokens=99, reason_sentences=3)
    rows = reasons(
        SPEC,
        cfg,
        gen,
        [{"id": 0, "input": "Show the uptime of the machine", "student": "no", "teacher": "Think: x\nAct: bash"}],
    )
    convs, params = gen.calls[0]
    assert (params.temperature, params.top_p, params.max_new_tokens) == (0.65, 0.8, 99)
    text = convs[0][-1]["content"]
    assert "In about 3 sentences" in text and "AS-IS answer" in text and "Think: x\nAct: bash" in text
    assert rows == [
        {
            "id": 0,
            "reason": "The prompt demands Think/Act lines, so for 'Show the uptime of the "
            "machine' the answer becomes an action.",
            "reason_finish": "stop",
        }
    ]
