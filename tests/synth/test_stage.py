"""The synthesis stage end to end in a local store: join by id, reasons, filters, resume."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from genpi import artifacts
from genpi.config import GenPIConfig, load_config
from genpi.prompt.episodes import END_TOKEN
from genpi.prompt.splits import TEST, TRAIN, VAL, assign_splits
from genpi.prompt.views import NO_REASON
from genpi.store import LocalStore
from genpi.synth.stage import TooFewInputs, join_by_id, reason_ids, synthesize
from tests.fakes import FakeEngine, ScriptedFailure, World, kind_of, mini_spec, task_of

SPEC = mini_spec()


# ------------------------------------------------------------------ synthesize end to end


def test_join_by_id_never_by_position() -> None:
    inputs = [{"id": 0, "input": "a"}, {"id": 1, "input": "b"}]
    outputs = [{"id": 1, "teacher": "B"}, {"id": 0, "teacher": "A"}]  # e.g. from replicas in another order
    assert join_by_id(inputs, outputs) == [
        {"id": 0, "input": "a", "teacher": "A"},
        {"id": 1, "input": "b", "teacher": "B"},
    ]
    with pytest.raises(ValueError, match=r"lack ids \[1\]"):
        join_by_id(inputs, outputs[1:])


def tiny_config(**synth) -> GenPIConfig:
    overrides = {
        "synth.num_inputs": 6,
        "synth.min_inputs": 4,
        "synth.part_size": 4,
        "synth.max_turns": 3,
        "synth.inputs_per_request": 3,
        # the scripted inputs differ in one number: near duplicates by design (tested apart)
        "synth.near_duplicate_threshold": 0.0,
        "synth.reason_fraction": 1.0,
        # every record trained on (and so role-played) unless a test says otherwise
        "split.val_fraction": 0.0,
        "split.test_fraction": 0.0,
        "models.generator.name": "tiny-random-llama",
        "models.target.name": "tiny-random-llama",
    }
    overrides.update({k if "." in k else f"synth.{k}": v for k, v in synth.items()})
    return load_config("local", overrides=overrides)


def test_reasons_and_role_play_run_side_by_side(tmp_path: Path) -> None:
    """Reasons (generator) and role play (target) overlap: each waits for the other to have started."""
    import threading

    world, both_started = World(SPEC), threading.Barrier(2, timeout=30)

    def meet_once(kind: str):
        met = []

        def reply(conversation, params):
            if kind_of(conversation) == kind and not met:
                met.append(True)
                both_started.wait()  # raises BrokenBarrierError if the other side never comes
            return world(conversation, params)

        return reply

    generator, target = FakeEngine(meet_once("reason")), FakeEngine(meet_once("environment"))
    prefix = synthesize(SPEC, tiny_config(), generator, target, LocalStore(tmp_path))
    assert LocalStore(tmp_path).is_done(prefix)


def test_synthesize_end_to_end_and_rerun(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    cfg = tiny_config()
    world = World(SPEC)
    generator, target = FakeEngine(world), FakeEngine(world)
    prefix = synthesize(SPEC, cfg, generator, target, store)
    assert prefix == artifacts.synth_prefix(SPEC, cfg)
    for name in ("records.jsonl", "quality.json", "_SUCCESS", "inputs/inputs.jsonl"):
        assert store.exists(f"{prefix}/{name}"), name
    assert not store.exists(f"{prefix}/split.json")  # the split is derived from ids by each stage
    assert store.is_done(prefix) and store.done_info(prefix)["records"] == 6

    records = store.get_jsonl(f"{prefix}/records.jsonl")
    assert [r["id"] for r in records] == list(range(6))
    assert [r["input"] for r in records] == [f"Report the size of the folder /data/set{k} in bytes." for k in range(6)]
    r0 = records[0]
    assert r0["student"].startswith("I am a language model")
    assert r0["teacher"].startswith("Think: measure it.") and "reason" in r0 and r0["end"] == END_TOKEN
    assert r0["turns"] == [
        {
            "agent": "Think: measure it.\nAct: bash\n```bash\ndu -sb /data\n```",
            "observation": "Output: 4096",
            "agent_finish": "stop",
        },
        {"agent": "Think: the shell printed it.\nAct: finish", "observation": "", "agent_finish": "stop"},
    ]
    assert all("split" not in r and r["turns_generated"] == 2 for r in records)
    quality = store.get_json(f"{prefix}/quality.json")
    assert quality["records"] == 6 and quality["avg_turns"] == 2.0 and quality["hit_max_turns"] == 0.0
    assert quality["missing_final_action"] == 0.0 and quality["max_turns"] == 3
    assert quality["inputs"]["kept"] == 6
    assert (
        quality["off_format_turns_removed"],
        quality["records_cut_by_format_filter"],
        quality["records_without_valid_turns"],
    ) == (0, 0, 0)
    assert quality["agent_turns_in_action_format"] == quality["agent_turns_in_action_format_after_filter"] == 1.0

    # generator: 1 input round + 2 reason parts; target: 2 output parts + 2 role-play parts x (2 turns x 2
    # calls - 1): the agent's first turn is the teacher's single-turn output, not generated again
    assert len(generator.calls) == 3
    assert len(target.calls) == 2 + 2 * 3
    assert [len(c) for c, _ in target.calls[:2]] == [8, 4]  # students + teachers, per part

    idle = FakeEngine(lambda c, p: pytest.fail("a finished synthesis must not generate"))
    assert synthesize(SPEC, cfg, idle, idle, store) == prefix
    assert idle.calls == []


def test_reason_ids_pick_a_share_apart_from_the_split() -> None:
    ids = list(range(100))
    picked = reason_ids(ids, 0.35, seed=0)
    assert len(picked) == 35 and picked == reason_ids(list(reversed(ids)), 0.35, seed=0)
    assert reason_ids(ids, 0.35, seed=1) != picked
    assert reason_ids(ids, 1.0, 0) == set(ids) and reason_ids(ids, 0.0, 0) == set()
    assert len(reason_ids(ids[:3], 0.01, 0)) == 1  # a fraction above 0 explains at least one
    # salted apart from the split: the explained records spread over train, validation and test
    split = assign_splits(ids, 0.1, 0.3, seed=0)
    assert {split[i] for i in picked} == {TRAIN, VAL, TEST}


def test_synthesize_explains_only_reason_fraction(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    cfg = tiny_config(reason_fraction=0.5)
    world = World(SPEC)
    generator = FakeEngine(world)
    prefix = synthesize(SPEC, cfg, generator, FakeEngine(world), store)
    records = store.get_jsonl(f"{prefix}/records.jsonl")
    explained = [r["id"] for r in records if r["reason_finish"] != NO_REASON]
    assert set(explained) == reason_ids(list(range(6)), 0.5, cfg.synth.seed) and len(explained) == 3
    assert all(r["reason"] == "" for r in records if r["id"] not in explained)
    assert all(r["reason"] and r["student"] for r in records if r["id"] in explained)
    assert len(generator.calls[-1][0]) == 3  # one reason request per explained record
    assert store.get_json(f"{prefix}/quality.json")["reasons"] == 3


@pytest.mark.parametrize("filter_on", [True, False])
def test_synthesize_filters_off_format_turns(tmp_path: Path, filter_on: bool) -> None:
    """Odd inputs get a chatty (off-format) second agent turn: bash, chatty, finish."""
    store = LocalStore(tmp_path)
    cfg = tiny_config(filter_off_format=filter_on)
    world = World(SPEC, chatty_turn=lambda task: 2 if task.endswith(("1 in bytes.", "3 in bytes.")) else 0)
    prefix = synthesize(SPEC, cfg, FakeEngine(world), FakeEngine(world), store)
    raw = [c for key in store.list_keys(f"{prefix}/conversations") for c in store.get_jsonl(key)]
    assert [len(c["turns"]) for c in raw] == [2, 3, 2, 3, 2, 2]  # the stored parts keep every turn
    records = store.get_jsonl(f"{prefix}/records.jsonl")
    assert [r["turns_generated"] for r in records] == [2, 3, 2, 3, 2, 2]
    quality = store.get_json(f"{prefix}/quality.json")
    assert quality["agent_turns_in_action_format"] == round(12 / 14, 4)  # before the filter
    if filter_on:
        assert [len(r["turns"]) for r in records] == [2, 1, 2, 1, 2, 2]
        assert records[1]["turns"] == raw[1]["turns"][:1]
        assert (quality["off_format_turns_removed"], quality["records_cut_by_format_filter"]) == (4, 2)
        assert quality["agent_turns_in_action_format_after_filter"] == 1.0
    else:
        assert [r["turns"] for r in records] == [c["turns"] for c in raw]
        assert (quality["off_format_turns_removed"], quality["records_cut_by_format_filter"]) == (0, 0)
        assert quality["agent_turns_in_action_format_after_filter"] == round(12 / 14, 4)
    assert quality["records_without_valid_turns"] == 0


@pytest.mark.parametrize("resamples", [2, 0])
def test_synthesize_resamples_off_format_turns(tmp_path: Path, resamples: int) -> None:
    """A target that follows its prompt only when sampling: resampled first turns replace the
    chatty ones (counted), so the filter keeps every conversation whole; with 0 tries it cuts them."""
    store = LocalStore(tmp_path)
    world = World(
        SPEC,
        chatty_turn=lambda task: 1 if task.endswith(("1 in bytes.", "3 in bytes.")) else 0,
        sampling_fixes_chatty=True,
    )
    prefix = synthesize(SPEC, tiny_config(agent_resamples=resamples), FakeEngine(world), FakeEngine(world), store)
    records = store.get_jsonl(f"{prefix}/records.jsonl")
    quality = store.get_json(f"{prefix}/quality.json")
    if resamples:
        assert [len(r["turns"]) for r in records] == [2] * 6
        assert [any(t.get("resampled") for t in r["turns"]) for r in records] == [
            False,
            True,
            False,
            True,
            False,
            False,
        ]
        assert quality["agent_turns_resampled_into_format"] == 2 and quality["off_format_turns_removed"] == 0
    else:
        assert [len(r["turns"]) for r in records] == [2, 0, 2, 0, 2, 2]
        assert quality["agent_turns_resampled_into_format"] == 0 and quality["off_format_turns_removed"] == 4
    assert quality["teacher_action_format"] == round(4 / 6, 4)  # the greedy single-turn outputs are kept


def test_split_config_is_part_of_the_synthesis_key() -> None:
    cfg = tiny_config()
    other = dataclasses.replace(cfg, split=dataclasses.replace(cfg.split, val_fraction=0.3, test_fraction=0.05, seed=9))
    assert artifacts.synth_hash(other) != artifacts.synth_hash(cfg)  # it decides what is role-played
    assert artifacts.run_hash(other) != artifacts.run_hash(cfg)
    assert artifacts.synth_hash(tiny_config(filter_off_format=False)) != artifacts.synth_hash(cfg)


def test_test_records_get_single_turn_outputs_but_no_reason_or_role_play(tmp_path: Path) -> None:
    """Training never reads a test record and evaluation plays its episodes itself: synthesis
    gives it the student's and the teacher's first replies only."""
    store = LocalStore(tmp_path)
    cfg = tiny_config(**{"split.test_fraction": 0.5})
    world = World(SPEC)
    generator, target = FakeEngine(world), FakeEngine(world)
    records = store.get_jsonl(f"{synthesize(SPEC, cfg, generator, target, store)}/records.jsonl")
    split = assign_splits([r["id"] for r in records], 0.0, 0.5, cfg.split.seed)
    test = [r for r in records if split[r["id"]] == TEST]
    assert len(records) == 6 and len(test) == 3
    for r in records:
        assert r["student"] and r["teacher"].startswith("Think:")
        if split[r["id"]] == TEST:
            assert (r["turns"], r["end"], r["reason"], r["reason_finish"]) == ([], TEST, "", "none")
        else:
            assert len(r["turns"]) == 2 and r["end"] == END_TOKEN and r["reason"]
    # generator: 1 input round + 1 reason part of the 3 trained records; target: 2 output parts +
    # 1 role-play part of 2 turns (the first is the teacher's output: 3 calls)
    assert len(generator.calls) == 2 and len(target.calls) == 2 + 3
    quality = store.get_json(f"{artifacts.synth_prefix(SPEC, cfg)}/quality.json")
    assert (quality["records"], quality["test_records"], quality["reasons"]) == (3, 3, 3)


def test_synthesize_resumes_after_a_crash_in_role_play(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    cfg = tiny_config()
    world = World(SPEC)
    generator = FakeEngine(world)
    # crash on the first environment call of the second role-play part
    env_calls = []

    def fail_on(n, convs, params):
        if kind_of(convs[0]) == "environment":
            env_calls.append(n)
            return len(env_calls) == 3
        return False

    target = FakeEngine(world, fail_on=fail_on)
    with pytest.raises(ScriptedFailure):
        synthesize(SPEC, cfg, generator, target, store)
    prefix = artifacts.synth_prefix(SPEC, cfg)
    assert not store.is_done(prefix)
    assert store.list_keys(f"{prefix}/conversations") == [f"{prefix}/conversations/part-00000.jsonl"]
    inputs_before = store.get_jsonl(f"{prefix}/inputs/inputs.jsonl")

    generator2 = FakeEngine(lambda c, p: pytest.fail("inputs and reasons must be reused"))
    target2 = FakeEngine(World(SPEC))
    synthesize(SPEC, cfg, generator2, target2, store)
    assert generator2.calls == []
    # only the missing role-play part (2 records, 2 turns): agent, env, agent, env; no single-turn outputs
    assert [kind_of(c[0]) for c, _ in target2.calls] == ["environment", "agent", "environment"]
    assert all(len(c) == 2 for c, _ in target2.calls)
    assert {task_of(c, SPEC) for convs, _ in target2.calls for c in convs} == {x["input"] for x in inputs_before[4:]}
    records = store.get_jsonl(f"{prefix}/records.jsonl")
    assert [r["input"] for r in records] == [x["input"] for x in inputs_before]
    assert all(r["end"] == END_TOKEN for r in records)


def test_too_few_inputs_names_the_prompt_file(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    cfg = tiny_config(max_input_rounds=2)
    generator = FakeEngine(lambda c, p: "1. ok\n2. sure\n3. Count the lines of /etc/passwd.")
    with pytest.raises(
        TooFewInputs,
        match=r"prompts/mini-shell\.md: the generator wrote only 0 usable unique "
        r"inputs in 2 rounds \(need synth\.min_inputs=4\)",
    ):
        synthesize(SPEC, cfg, generator, FakeEngine(lambda c, p: pytest.fail("no target calls")), store)
    assert len(generator.calls) == 2
    assert not store.is_done(artifacts.synth_prefix(SPEC, cfg))
