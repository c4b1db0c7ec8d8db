"""The evaluate stage's parts: teacher-forced scores, adapters per request, the gate, user inputs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from genpi.config import EvalConfig
from genpi.divergence import topk_tail_kl
from genpi.engines.base import SamplingParams
from genpi.engines.hf import HFEngine
from genpi.errors import GenPIError
from genpi.evaluate.gate import gate_decision
from genpi.evaluate.stage import publish_run
from genpi.evaluate.teacher_forced import reply_ids, score_replies
from genpi.models import TINY, resolve_model
from genpi.prompt.real_inputs import load_real_inputs

pytestmark = pytest.mark.timeout(180)

CHATS = [
    [{"role": "user", "content": "List the files in /tmp."}],
    [{"role": "user", "content": "How much disk space is free?"}],
    [{"role": "user", "content": "hi"}],
]


def _logp(probs: list[float]) -> torch.Tensor:
    return torch.tensor([probs]).clamp_min(1e-30).log()


def test_topk_tail_kl_known_answers() -> None:
    p = _logp([0.5, 0.5, 0.0, 0.0])
    q = _logp([0.25, 0.25, 0.25, 0.25])
    assert topk_tail_kl(p, p, 2).item() == pytest.approx(0.0, abs=1e-6)
    assert topk_tail_kl(p, q, 2).item() == pytest.approx(math.log(2), rel=1e-5)
    # k = 1: the top token, then a tail bucket of 0.5 (teacher) vs 0.75 (student)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert topk_tail_kl(p, q, 1).item() == pytest.approx(expected, rel=1e-5)
    assert topk_tail_kl(q, p, 4).item() > 1  # the student puts no mass where the teacher does


@pytest.fixture(scope="module")
def engine_and_adapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[HFEngine, str]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(TINY), dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(str(folder))
    engine = HFEngine(TINY, dtype="float32", batch_size=4)
    return engine, engine.add_adapter(folder)


def test_adapters_per_request_match_single_adapter_runs(engine_and_adapter) -> None:
    engine, adapter = engine_and_adapter
    params = SamplingParams(max_new_tokens=10)
    base = [g.text for g in engine.generate(CHATS, params)]
    tuned = [g.text for g in engine.generate(CHATS, params, [adapter] * 3)]
    mixed = [g.text for g in engine.generate(CHATS, params, [None, adapter, None])]
    assert mixed == [base[0], tuned[1], base[2]]
    assert tuned != base  # the adapter changes what the model says
    with pytest.raises(GenPIError, match="was not loaded"):
        engine.generate(CHATS[:1], params, ["/no/such/adapter"])


def test_teacher_forced_scores(engine_and_adapter) -> None:
    engine, adapter = engine_and_adapter
    prompt = [{"role": "system", "content": "Answer with Act: bash and one command."}]
    replies = [g.text for g in engine.generate([prompt + c for c in CHATS], SamplingParams(max_new_tokens=8))]
    scores = score_replies(
        engine, [prompt + c for c in CHATS], CHATS, replies, {"base": None, "same": None, "adapter": adapter}, top_k=5
    )
    assert [s.tokens for s in scores["teacher"]] == [
        len(reply_ids(engine.tokenizer, prompt + c, r)) for c, r in zip(CHATS, replies)
    ]
    for t, b, same in zip(scores["teacher"], scores["base"], scores["same"]):
        assert t.kl_sum == 0 and b.kl_sum > 0 and b == same  # deterministic, and context matters
    # The teacher's greedy tokens are its most likely ones: it finds them likelier than the students do.
    assert sum(s.nll_sum for s in scores["teacher"]) < sum(s.nll_sum for s in scores["adapter"])
    # Computing the shared prompt once gives the same figures as computing it for every reply.
    plain = score_replies(
        engine, [prompt * 20 + c for c in CHATS], CHATS, replies, {"base": None}, 5, share_prefix=False
    )
    shared = score_replies(engine, [prompt * 20 + c for c in CHATS], CHATS, replies, {"base": None}, 5)
    for a, b in zip(plain["teacher"] + plain["base"], shared["teacher"] + shared["base"]):
        assert a.tokens == b.tokens and a.nll_sum == pytest.approx(b.nll_sum, rel=1e-4, abs=1e-4)
        assert a.kl_sum == pytest.approx(b.kl_sum, rel=1e-3, abs=1e-4)
    # With the teacher's own context, a student without adapter is the teacher: KL 0, same NLL.
    own = score_replies(
        engine, [prompt + c for c in CHATS], [prompt + c for c in CHATS], replies, {"base": None}, top_k=5
    )
    assert all(
        b.kl_sum == pytest.approx(0, abs=1e-5) and b.nll_sum == pytest.approx(t.nll_sum, rel=1e-5)
        for t, b in zip(own["teacher"], own["base"])
    )


def test_teacher_forced_scores_of_an_episode_read_off_one_row(engine_and_adapter) -> None:
    """Every turn of an episode, scored together (one row per episode: a turn's context and reply
    open the next turn's context; rows batched over one copy of the prompt), scores as that turn
    scored alone."""
    from genpi.chat import chat_ids
    from genpi.evaluate.teacher_forced import _rows

    engine, adapter = engine_and_adapter
    prompt = [{"role": "system", "content": "Answer with Act: bash and one command. " * 8}]
    teacher_ctx, student_ctx, replies = [], [], []
    for chat in CHATS:
        history: list[dict[str, str]] = []
        for t in range(3):
            reply = f"Act: bash\n```bash\nls /tmp/{t} {chat[0]['content'][:5]}\n```"
            teacher_ctx.append(prompt + chat + history)
            student_ctx.append(chat + history)
            replies.append(reply)
            history += [{"role": "assistant", "content": reply}, {"role": "user", "content": f"file{t}.txt"}]
    systems = {"base": None, "adapter": adapter}
    together = score_replies(engine, teacher_ctx, student_ctx, replies, systems, top_k=5)
    contexts = {i: chat_ids(engine.tokenizer, c, True) for i, c in enumerate(teacher_ctx)}
    targets = [reply_ids(engine.tokenizer, c, r) for c, r in zip(teacher_ctx, replies)]
    assert len(_rows(contexts, targets)) == len(CHATS)  # one row per episode
    for i, (tc, sc, reply) in enumerate(zip(teacher_ctx, student_ctx, replies)):
        alone = score_replies(engine, [tc], [sc], [reply], systems, top_k=5)
        for system, scores in alone.items():
            got, want = together[system][i], scores[0]
            assert got.tokens == want.tokens
            assert got.nll_sum == pytest.approx(want.nll_sum, rel=1e-4, abs=1e-4)
            assert got.kl_sum == pytest.approx(want.kl_sum, rel=1e-3, abs=1e-4)


def _report(fv_retention: float | None, nll_gap: float | None) -> dict:
    comparison = {
        "format_valid": {"retention": fv_retention, "gap_closed": None},
        "nll": {"retention": None, "gap_closed": nll_gap},
    }
    return {"sets": {"test": {"comparison": comparison}}}


def test_gate_both_ways() -> None:
    cfg = EvalConfig(min_retention=0.8, min_gap_closed=0.5)
    assert gate_decision(_report(0.9, 0.6), cfg)["passed"]
    failed = gate_decision(_report(0.5, 0.6), cfg)
    assert not failed["passed"] and "format_valid retention 50% < 80% (short by 30%)" in failed["summary"]
    assert not gate_decision(_report(0.9, 0.2), cfg)["passed"]
    near = gate_decision(_report(0.9, 0.4996), cfg)  # a miss whole percents would hide
    assert not near["passed"] and "nll gap_closed 49.96% < 50% (short by 0.04%)" in near["summary"]
    assert not gate_decision(_report(None, 0.9), cfg)["passed"]  # an undefined figure never passes
    assert not gate_decision({"sets": {}}, cfg)["passed"]


def test_user_inputs_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "shell-agent.jsonl").write_text('{"input": "Count files in /etc."}\n\n{"input": "Free space?"}\n')
    assert load_real_inputs(tmp_path, ["shell-agent", "web"]) == {
        "shell-agent": ["Count files in /etc.", "Free space?"]
    }
    (tmp_path / "nobody.jsonl").write_text('{"input": "x"}\n')
    with pytest.raises(GenPIError, match="nobody.jsonl match\\(es\\) no prompt.*shell-agent"):
        load_real_inputs(tmp_path, ["shell-agent"])
    (tmp_path / "nobody.jsonl").unlink()
    (tmp_path / "shell-agent.jsonl").write_text('{"input": "ok"}\n{"text": "wrong key"}\n')
    with pytest.raises(GenPIError, match="shell-agent.jsonl:2: expected an object"):
        load_real_inputs(tmp_path, ["shell-agent"])
    with pytest.raises(GenPIError, match="is not a folder"):
        load_real_inputs(tmp_path / "missing", ["shell-agent"])


def test_publish_is_immutable_and_listed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from genpi import artifacts, registry
    from genpi.cli import main
    from genpi.config import load_config
    from genpi.evaluate.report import batch_rows
    from genpi.store import open_store
    from tests.fakes import mini_spec

    spec, store = mini_spec(), open_store(str(tmp_path / "store"))
    cfg = load_config("local", overrides={"store.url": str(tmp_path / "store")})
    source = f"{artifacts.train_prefix(spec, cfg)}/adapter"
    store.put_text(f"{source}/adapter_config.json", "{}")
    store.put_bytes(f"{source}/adapter_model.safetensors", b"weights")
    comparison = {
        "format_valid": {"teacher": 0.75, "base": 0.0, "adapter": 0.75, "retention": 1.0, "gap_closed": 1.0},
        "nll": {"teacher": 0.5, "base": 2.5, "adapter": 1.0, "retention": 0.5, "gap_closed": 0.75},
    }
    comparison["format_valid"]["retention_interval"] = [0.9, 1.1]  # the intervals the gate checks
    comparison["nll"]["gap_closed_interval"] = [0.6, 0.9]
    report = {
        "prompt": spec.name,
        "location": "somewhere/report.md",
        "efficiency": {"prompt_tokens": 900},
        "sets": {"test": {"n": 4, "comparison": comparison}},
    }
    report["gate"] = gate_decision(report, cfg.eval)
    where = publish_run(spec, cfg, store, report)
    version = artifacts.published_version(spec, cfg)
    entry = registry.resolve(store, spec.name)
    assert report["gate"]["passed"] and where == store.location(entry.prefix) and entry.version == version
    assert store.get_bytes(f"{entry.prefix}/adapter_model.safetensors") == b"weights"
    assert entry.files["adapter_model.safetensors"]["size"] == len(b"weights")
    assert publish_run(spec, cfg, store, report) == where  # the same adapter again: the same version
    store.put_bytes(f"{source}/adapter_model.safetensors", b"retrained")
    with pytest.raises(registry.PublishConflict, match="already published"):  # never overwritten
        publish_run(spec, cfg, store, report)
    assert store.get_bytes(f"{entry.prefix}/adapter_model.safetensors") == b"weights"
    [listed] = registry.published(store)
    assert listed.retention["format_valid"] == 1.0 and listed.gap_closed["nll"] == 0.75
    assert registry.resolve(store, f"{spec.name}@{version}") == listed

    assert main(["ls", "--store.url", str(tmp_path / "store")]) == 0
    out = capsys.readouterr().out
    assert f"{spec.name}@{version}" in out  # with the intervals the gate checked
    assert "format retention 100% [90%, 110%]" in out and "NLL gap closed 75% [60%, 90%]" in out
    assert main(["report", "--store.url", str(tmp_path / "store")]) == 2  # no batch yet: one clear line
    assert "has no batch reports yet" in capsys.readouterr().err
    report["published"] = where
    store.put_json(
        "batches/abc/report.json", {"finished_at": "2026-01-01T00:00:00+00:00", "prompts": batch_rows([report])}
    )
    assert main(["report", "--store.url", str(tmp_path / "store")]) == 0
    out = capsys.readouterr().out
    assert "batch abc" in out and f"| {spec.name} | 4 | 75% | 0% | 75% | 100% [90%, 110%] |" in out and "passed" in out
    assert main(["report", "", "--store.url", str(tmp_path / "store")]) == 2  # an empty id is not "the newest"
    assert "has no batch ''; batches there: abc" in capsys.readouterr().err


def test_agreement_under_the_teacher(engine_and_adapter, tmp_path: Path) -> None:
    """The teacher judges each system's first reply: its own greedy reply scores as in score_replies,
    and a first action counts as agreeing exactly when one of the teacher's samples has it."""
    from genpi.config import load_config
    from genpi.evaluate.references import make_references
    from genpi.evaluate.stage import Evaluation
    from genpi.prompt.spec import ActionFormat, PromptSpec, Turn
    from genpi.prompt.views import teacher_messages
    from genpi.store import open_store

    engine, adapter = engine_and_adapter
    spec = PromptSpec(
        name="mini",
        source="mini.md",
        turns=(Turn("system", "Answer with Act: and a word."),),
        action_format=ActionFormat(actions=(r"(?s).*",)),
    )  # every reply is an action: its text
    cfg = load_config("local", overrides={"eval.teacher_samples": 3, "eval.max_tokens": 8})
    inputs = ["count the files", "show the date"]
    greedy = [
        g.text for g in engine.generate([teacher_messages(spec, x) for x in inputs], SamplingParams(max_new_tokens=8))
    ]
    episodes = {
        "teacher": [{"input": x, "turns": [{"agent": r, "observation": ""}]} for x, r in zip(inputs, greedy)],
        "base": [{"input": x, "turns": [{"agent": "no such action", "observation": ""}]} for x in inputs],
        "adapter": [{"input": x, "turns": []} for x in inputs],
    }
    store, sets = open_store(str(tmp_path / "store")), {"test": [{"input": x} for x in inputs]}
    references = make_references(spec, cfg, store, engine, [], sets=sets)
    run = Evaluation(spec, cfg, store, engine, adapter, "eval/x", [], lambda _: None, sets=sets, references=references)
    rows = run.agreement("test", episodes)
    own = score_replies(engine, [teacher_messages(spec, x) for x in inputs], [], greedy, {}, top_k=5)["teacher"]
    for row, score, sampled_greedy in zip(rows, own, greedy):
        assert row["nll_under_teacher"]["teacher"] == {"tokens": score.tokens, "nll_sum": score.nll_sum}
        assert row["in_teacher_samples"]["teacher"] == (" ".join(sampled_greedy.split()) in row["teacher_actions"])
        assert row["in_teacher_samples"]["base"] is False and 1 <= len(row["teacher_actions"]) <= 3
    assert run.agreement("test", {}) == rows  # stored: a rerun reads it back


def test_references_play_teacher_and_base_together_as_each_alone(engine_and_adapter, tmp_path: Path) -> None:
    """Every set's teacher and base episodes, played in one lockstep, are the episodes each plays
    alone (test inputs opening with the records' first turns); the teacher's samples are k per test
    input, seeded; a second call finds them all."""
    from genpi.config import load_config
    from genpi.engines.base import Generation
    from genpi.evaluate.references import make_references, play
    from genpi.prompt.spec import ActionFormat, EnvironmentSpec, PromptSpec, Turn
    from genpi.prompt.views import student_messages, teacher_messages
    from genpi.store import open_store

    engine, _ = engine_and_adapter
    spec = PromptSpec(
        name="mini",
        source="mini.md",
        turns=(Turn("system", "Answer with Act: and a word."),),
        max_turns=3,
        environment=EnvironmentSpec(description="You are the shell. Print what the command prints."),
        action_format=ActionFormat(actions=(r"(?s).*",)),
    )
    cfg = load_config(
        "local",
        overrides={
            "eval.teacher_samples": 3,
            "eval.max_tokens": 8,
            "eval.env_max_tokens": 8,
            "synth.output_max_tokens": 8,
        },
    )
    test = [
        {"input": x, "teacher": f"Act: {x}", "teacher_finish": "stop", "student": "hello", "student_finish": "stop"}
        for x in ("count the files", "show the date", "list users")
    ]
    real = [{"input": x} for x in ("free disk space", "who am i")]
    store, sets = open_store(str(tmp_path / "store")), {"test": test, "real": real}
    lines: list[str] = []
    prefix = make_references(spec, cfg, store, engine, ["free disk space", "who am i"], lines.append, sets=sets)
    for name, items in sets.items():
        inputs = [item["input"] for item in items]
        for system, views, field in (
            ("teacher", [teacher_messages(spec, x) for x in inputs], "teacher"),
            ("base", [student_messages(x) for x in inputs], "student"),
        ):
            firsts = [Generation(i[field], "stop", 0, 0) for i in items] if name == "test" else None
            alone = play(spec, cfg, views, inputs, engine.generate, engine.generate, firsts)
            assert store.get_jsonl(f"{prefix}/{name}-{system}.jsonl") == alone
            if firsts:
                assert [e["turns"][0]["agent"] for e in alone] == [i[field] for i in items]
            assert max(len(e["turns"]) for e in alone) == 3  # the evaluation's turn limit
    samples = store.get_jsonl(f"{prefix}/test-samples.jsonl")
    assert [row["input"] for row in samples] == [i["input"] for i in test] and all(
        len(r["samples"]) == 3 for r in samples
    )
    assert any(len(set(row["samples"])) > 1 for row in samples)  # sampled, each with its own seed
    assert not store.exists(f"{prefix}/real-samples.jsonl")  # the test split's only
    assert any("teacher samples" in line for line in lines)
    again: list[str] = []
    assert make_references(spec, cfg, store, engine, ["free disk space", "who am i"], again.append, sets=sets) == prefix
    assert not again


def test_sampled_action_match_both_ways_in_the_report() -> None:
    from genpi.evaluate.report import summarize_set
    from genpi.prompt.spec import ActionFormat, PromptSpec, Turn

    spec = PromptSpec(
        name="mini",
        source="mini.md",
        turns=(Turn("system", "Act."),),
        action_format=ActionFormat(actions=(r"^Act: \S",)),
    )
    eps = [{"input": str(i), "turns": [{"agent": "Act: ls", "observation": ""}]} for i in range(4)]
    scores = [{s: {"tokens": 1, "nll_sum": 1.0, "kl_sum": 0.0} for s in ("teacher", "base", "adapter")}] * 4
    agreement = [
        {
            "nll_under_teacher": {
                s: {"tokens": 2, "nll_sum": v} for s, v in (("teacher", 1.0), ("base", 9.0), ("adapter", 2.0 + i))
            },
            "teacher_actions": ["Act: ls"],
            "in_teacher_samples": {"teacher": True, "base": False, "adapter": i < 3},
        }
        for i in range(4)
    ]
    summary = summarize_set(spec, {"teacher": eps, "base": eps, "adapter": eps}, scores, agreement=agreement)
    row = summary["comparison"]["action_in_teacher_samples"]
    assert (row["teacher"], row["base"], row["adapter"], row["retention"]) == (1.0, 0.0, 0.75, 0.75)
    nll = summary["comparison"]["nll_under_teacher"]
    assert nll["adapter"] == pytest.approx(14 / 8) and nll["gap_closed"] == pytest.approx((1.75 - 4.5) / (0.5 - 4.5))
