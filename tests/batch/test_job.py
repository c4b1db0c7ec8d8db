"""The main job end to end through Ray on the tiny model, its rerun, and its command line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from genpi.cli.main import build_parser
from tests.batch.command import TINY_RUN, genpi_command, run_job
from tests.repo import ROOT


@pytest.mark.timeout(600)
def test_job_end_to_end_and_rerun(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from genpi.models import resolve_model
    from genpi.store import open_store

    prompts = tmp_path / "prompts"
    shutil.copytree(ROOT / "prompts", prompts)
    (prompts / "broken.md").write_text("---\nname: [unclosed\n---\nYou are an agent.\n")  # one bad file among good ones
    store_dir = tmp_path / "artifacts"
    sweep = ["--train.methods", "genpi,sft"]  # two Ray Train runs per prompt; validation chooses one
    first = run_job("--prompts", str(prompts), "--store.url", str(store_dir), *TINY_RUN, *sweep)
    assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-3000:]  # 1: a prompt failed
    assert "started a local Ray cluster on 127.0.0.1" in first.stdout
    assert "broken.md: FAILED in load: " in first.stdout and "the other prompts go on" in first.stdout
    assert "Traceback" not in first.stdout + first.stderr
    assert "State API may be temporarily unavailable" not in first.stdout + first.stderr  # no dashboard, no spam

    store = open_store(str(store_dir))
    summaries = [k for k in store.list_keys("prompts") if "/train/" in k and k.endswith("/summary.json")]
    assert len(summaries) == 6
    assert sorted(store.get_json(k)["method"] for k in summaries) == ["genpi"] * 3 + ["sft"] * 3
    assert not [k for k in store.list_keys("prompts") if "/checkpoints/" in k or "/ray/" in k]  # dropped when done
    assert first.stdout.count("(best of 2 on validation)") == 3
    base = resolve_model("tiny-random-llama")
    for key in summaries:
        summary = store.get_json(key)
        adapter = Path(summary["adapter"])
        assert adapter.name == "adapter"
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter))
        assert any("lora_A" in name for name, _ in model.named_parameters())
        provenance = json.loads((adapter / "genpi.json").read_text())
        assert provenance["prompt_name"] in key and provenance["base_model"] == "tiny-random-llama"
    records = [k for k in store.list_keys("prompts") if k.endswith("/records.jsonl")]
    assert len(records) == 3 and all(len(store.get_jsonl(k)) == 6 for k in records)

    # Every prompt has a fidelity report of three systems on its test inputs, with plots and a gate.
    reports = [k for k in store.list_keys("prompts") if "/eval/" in k and k.endswith("/report.json")]
    assert len(reports) == 3
    for key in reports:
        report = store.get_json(key)
        test = report["sets"]["test"]
        assert test["n"] == 2 and set(test["systems"]) == {"teacher", "base", "adapter"}
        assert {"format_valid", "nll", "kl_topk", "token_f1", "embedding_similarity"} <= set(test["comparison"])
        assert report["efficiency"]["prompt_tokens"] > 500 and len(report["efficiency"]["latency_s"]["adapter"]) == 2
        assert report["gate"]["summary"] and report["gate"]["passed"] is False  # a random model keeps no format
        for name in ("report.md", "retention.png", "efficiency.png"):
            assert store.exists(key.replace("report.json", name))
        assert f"{report['prompt']}:" in first.stdout and "NOT published (gate failed)" in first.stdout
    batch_files = {k.rsplit("/", 1)[-1] for k in store.list_keys("batches")}
    assert {"manifest.json", "report.json", "report.md", "retention.png"} <= batch_files
    batch_md = next(store.get_text(k) for k in store.list_keys("batches") if k.endswith("report.md"))
    assert batch_md.count("runs on the validation split") == 3 and "| sft | - | 1 |" in batch_md
    table = genpi_command("report", "--store.url", str(store_dir))
    assert table.returncode == 0 and table.stdout.count("FAILED: format_valid") == 3, table.stdout + table.stderr
    listing = genpi_command("ls", "--store.url", str(store_dir))
    assert listing.returncode == 0 and "no published adapters" in listing.stdout
    status = genpi_command("status", "--store.url", str(store_dir))
    assert status.returncode == 0 and "\nfinished " in status.stdout, status.stdout + status.stderr
    assert status.stdout.count("not published: format_valid") == 3 and status.stdout.count("synthesis ") >= 3
    assert "broken.md: FAILED in load: " in status.stdout
    (prompts / "broken.md").unlink()
    markers = {k: store.get_bytes(k) for k in store.list_keys("prompts") if k.endswith("_SUCCESS")}

    moved = tmp_path / "moved"  # the store moved elsewhere: its work is found, and named where it is now
    store_dir.rename(moved)
    store = open_store(str(moved))
    second = run_job("--prompts", str(prompts), "--store.url", str(moved), *TINY_RUN, *sweep)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert str(store_dir) not in second.stdout and f"{moved}/prompts/" in second.stdout
    assert "starting engines" not in second.stdout  # nothing to synthesize
    assert (
        second.stdout.count("adapter found at") == 6
        and (second.stdout + second.stderr).count("evaluation found at") == 3
    )
    assert {k: store.get_bytes(k) for k in store.list_keys("prompts") if k.endswith("_SUCCESS")} == markers


def test_bad_input_is_one_clear_line(tmp_path: Path) -> None:
    missing = run_job("--prompts", str(tmp_path / "nope"), "--print-config", timeout=60)
    assert missing.returncode == 0  # --print-config validates config only
    assert missing.stdout.startswith("# profile auto: local shown")  # it says which profile it printed
    result = run_job("--prompts", str(tmp_path / "nope"), timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert str(tmp_path / "nope") in result.stderr and result.stderr.count("\n") == 1
    bad_flag = run_job("--train.pg-lambda", "2", timeout=60)
    assert bad_flag.returncode == 2 and "train.pg_lambda" in bad_flag.stderr and "Traceback" not in bad_flag.stderr
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "a.md").write_text("")
    empty = run_job("--prompts", str(tmp_path / "p"), timeout=60)
    assert empty.returncode == 2 and "a.md" in empty.stderr and "Traceback" not in empty.stderr


def test_help_describes_every_flag() -> None:
    for command in (
        [sys.executable, str(ROOT / "jobs" / "internalize.py"), "--help"],
        [str(Path(sys.executable).parent / "genpi"), "--help"],
    ):
        if not Path(command[0]).exists():
            pytest.skip("genpi console script not installed in this environment")
        text = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
        parser = build_parser()
        for action in parser._actions:
            for flag in action.option_strings:
                assert flag in text
            # argparse wraps lines (also at hyphens): compare without whitespace
            assert action.help and "".join(action.help.split()) in "".join(text.split())


def test_a_submitted_job_refuses_a_relative_store_in_rays_working_dir_copy(tmp_path: Path, monkeypatch, capsys) -> None:
    from genpi.cli import main

    copy = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    shutil.copytree(ROOT / "prompts", copy / "prompts")
    monkeypatch.chdir(copy)
    assert main(["--prompts", "prompts", "--profile", "local"]) == 2
    assert "Ray deletes after the job" in capsys.readouterr().err and not (copy / "artifacts").exists()
    assert main(["--prompts", "prompts", "--profile", "local", "--print-config"]) == 0  # nothing stored there


@pytest.mark.timeout(180)
@pytest.mark.parametrize("after", ["started a local Ray cluster", "pseudo inputs"])
def test_sigterm_ends_the_job_with_one_line_and_its_exit_code(tmp_path: Path, after: str) -> None:
    """What `ray job stop` and Kubernetes send: the driver unwinds (its local cluster stops with it),
    also while a stage's thread waits on an engine of that cluster."""
    import signal
    import time

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    job = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "jobs" / "internalize.py"),
            "--prompts",
            str(ROOT / "prompts"),
            "--store.url",
            str(tmp_path / "artifacts"),
            *TINY_RUN,
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    seen = ""
    while after not in seen and time.time() < deadline and job.poll() is None:
        seen += job.stdout.readline()
    assert after in seen, seen
    job.send_signal(signal.SIGTERM)
    out, err = job.communicate(timeout=120)
    assert job.returncode == 143, err[-2000:]
    assert "terminated (SIGTERM)" in err and "Traceback" not in err
