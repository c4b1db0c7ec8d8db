"""Trust: what the job logs, and bad input, never give away more than one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.repo import ROOT
from tests.s3_server import S3Server

VERBOSE_RUN = """
import sys
import genpi.ray_runtime
from genpi.cli.main import main
from genpi.errors import GenPIError

def stop(cfg):  # the store was opened and used; no cluster is needed to see what -v logs
    raise GenPIError("stopped before Ray")

genpi.ray_runtime.connect = stop
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.s3
@pytest.mark.timeout(60)
def test_verbose_logs_no_wire_trace(s3_env: S3Server) -> None:
    url = f"s3://{s3_env.create_bucket()}/runs"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            VERBOSE_RUN,
            "-v",
            "--prompts",
            str(ROOT / "prompts"),
            "--store.url",
            url,
            "--store.endpoint-url",
            s3_env.endpoint_url,
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 2 and "stopped before Ray" in out, out[-2000:]
    assert f"store {url}" in out  # it got as far as the store
    assert "Authorization" not in out and s3_env.access_key not in out and "x-amz" not in out.lower()


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{b}: &{b} [*{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}]\n" for a, b in zip("abcdefgh", "bcdefghi")
)
SHELL = "You are a shell agent. Answer with one command.\n"


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], Path]]:
    """Each case: the flags of a run and the file its error must name."""
    cases: dict[str, tuple[list[str], Path]] = {}

    def prompt_case(name: str, file: str, data: bytes) -> None:
        folder = tmp_path / name
        folder.mkdir()
        (folder / file).write_bytes(data)
        cases[name] = (["--prompts", str(folder)], folder / file)

    prompt_case("deep-json", "agent.json", b"[" * 200_000 + b"]" * 200_000)
    prompt_case("deep-yaml", "agent.yaml", b"turns: " + b"[" * 50_000 + b"]" * 50_000)
    prompt_case("alias-bomb", "agent.md", f"---\n{BOMB}---\n{SHELL}".encode())
    prompt_case("alias-bomb-name", "agent.yaml", f"{BOMB}name: *i\nturns: [{{role: system, content: hi}}]\n".encode())
    prompt_case("oversized", "agent.md", SHELL.encode() * 40_000)
    prompt_case("latin-1-prompt", "agent.md", "Réponds en français.\n".encode("latin-1"))
    prompt_case("impossible-date", "agent.md", f"---\nname: 2024-02-30\n---\n{SHELL}".encode())
    prompt_case("huge-yaml-int", "agent.md", f"---\nmax_turns: {'9' * 5000}\n---\n{SHELL}".encode())
    prompt_case(
        "huge-json-int",
        "agent.json",
        f'{{"turns": [{{"role": "system", "content": "x"}}], "max_turns": {"9" * 5000}}}'.encode(),
    )
    prompt_case("lone-surrogate", "agent.json", b'[{"role": "system", "content": "hi \\ud800 there"}]')
    prompt_case(
        "backtracking-regex",
        "agent.yaml",
        b"turns: [{role: system, content: hi}]\naction_format: {actions: ['^(a|aa)+$']}\n",
    )
    good = tmp_path / "good"
    good.mkdir()
    (good / "agent.md").write_text(SHELL)
    inputs = tmp_path / "latin-1-inputs"
    inputs.mkdir()
    (inputs / "agent.jsonl").write_bytes('{"input": "café"}\n'.encode("latin-1"))
    cases["latin-1-inputs"] = (["--prompts", str(good), "--eval-inputs", str(inputs)], inputs / "agent.jsonl")
    deep_inputs = tmp_path / "deep-inputs"
    deep_inputs.mkdir()
    (deep_inputs / "agent.jsonl").write_bytes(b"[" * 200_000 + b"]" * 200_000 + b"\n")
    cases["deep-inputs"] = (["--prompts", str(good), "--eval-inputs", str(deep_inputs)], deep_inputs / "agent.jsonl")
    huge_inputs = tmp_path / "huge-int-inputs"
    huge_inputs.mkdir()
    (huge_inputs / "agent.jsonl").write_text(f'{{"input": "ls", "n": {"9" * 5000}}}\n')
    cases["huge-int-inputs"] = (
        ["--prompts", str(good), "--eval-inputs", str(huge_inputs)],
        huge_inputs / "agent.jsonl",
    )
    for name, text in (("config-date", "store: {url: 2024-02-30}\n"), ("config-nan", "train: {learning_rate: .nan}\n")):
        cases[name] = (["--prompts", str(good), "--config", str(tmp_path / f"{name}.yaml")], tmp_path / f"{name}.yaml")
        (tmp_path / f"{name}.yaml").write_text(text)
    (tmp_path / "a-file").write_text("")  # a store path under a file: no folder can be made there
    cases["store-under-a-file"] = (
        ["--prompts", str(good), "--store.url", str(tmp_path / "a-file" / "store")],
        tmp_path / "a-file" / "store",
    )
    cases["unknown-model"] = (["--prompts", str(good), "--models.target.name", "nope-model"], Path("nope-model"))
    config = tmp_path / "bomb.yaml"
    config.write_text(BOMB.replace("i: &i", "train: &i").replace("a: &a", "x: &a"))
    cases["config-alias-bomb"] = (["--prompts", str(good), "--config", str(config)], config)
    return cases


def test_each_bad_input_is_one_line_and_exit_2_within_a_second(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import time

    from genpi.cli.main import main

    main(["--prompts", str(tmp_path / "missing")])  # imports done once, outside the timings
    capsys.readouterr()
    for name, (flags, file) in _bad_inputs(tmp_path).items():
        started = time.monotonic()
        code = main(flags)
        seconds = time.monotonic() - started
        err = capsys.readouterr().err
        assert code == 2, (name, err[-500:])
        assert err.count("\n") == 1 and str(file) in err and len(err) < 600, (name, err[:600])
        assert seconds < 1, (name, seconds)


def test_a_bom_is_accepted_in_real_inputs(tmp_path: Path) -> None:
    from genpi.prompt.real_inputs import load_real_inputs

    (tmp_path / "agent.jsonl").write_bytes("\ufeff".encode() + b'{"input": "ls -la"}\r\n{"input": "pwd"}\n')
    assert load_real_inputs(tmp_path, ["agent"]) == {"agent": ["ls -la", "pwd"]}


def test_error_messages_quote_input_with_a_bounded_repr() -> None:
    from genpi.errors import short_repr

    nested: list = []
    for _ in range(50):
        nested = [nested] * 9  # 9**50 values, shared
    cyclic: list = []
    cyclic.append(cyclic)
    assert len(short_repr(nested)) <= 80 and len(short_repr("x" * 10**6)) <= 80 and short_repr(cyclic)


def test_serve_refuses_a_busy_port_an_unknown_model_and_an_unreachable_store_before_ray_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    import ray

    from genpi import ray_runtime
    from genpi.cli.main import main

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    free = ray_runtime.free_port()
    store = ["--store.url", str(tmp_path / "store"), "--serve.port", str(free)]  # a later --serve.port wins
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = {
            f"serve.port {port} on serve.host '127.0.0.1' cannot be listened on": [*store, "--serve.port", str(port)],
            "unknown model 'nope-model'": [*store, "--models.target.name", "nope-model"],
            "cannot reach the S3 endpoint http://127.0.0.1:1": [
                *store,
                *("--store.url", "s3://bucket/x", "--store.endpoint-url", "http://127.0.0.1:1"),
            ],
        }
        for said, flags in cases.items():
            code = main(["serve", *flags])
            err = capsys.readouterr().err
            assert code == 2 and err.count("\n") == 1 and said in err, (said, err[-500:])
    assert not ray.is_initialized()


@pytest.mark.parametrize(
    ("key", "document", "commands"),
    [
        ("adapters/shell/v1/manifest.json", [], [["ls"], ["serve", "--check"]]),
        ("adapters/shell/v1/manifest.json", {"prompt": "shell", "published_at": 5}, [["ls"]]),
        ("batches/b1/manifest.json", {"state": "running", "prompts": [{"status": "failed"}]}, [["status"]]),
        ("batches/b1/manifest.json", {"seconds": "abc", "prompts": []}, [["status", "b1"]]),
        ("batches/b1/manifest.json", {"prompts": [{"status": "done"}]}, [["verify", "b1"]]),
        ("batches/b1/report.json", {"finished_at": "2026", "prompts": [{}]}, [["report"]]),
        ("batches/b1/report.json", [], [["report", "b1"]]),
    ],
)
def test_a_store_file_of_another_shape_is_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture, key: str, document: object, commands: list[list[str]]
) -> None:
    from genpi.cli.main import main
    from genpi.store import open_store

    open_store(str(tmp_path / "store")).put_json(key, document)
    for command in commands:
        assert main([*command, "--store.url", str(tmp_path / "store")]) == 2, command
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(tmp_path / "store" / key) in err and "genpi can read" in err, err


def test_verify_lists_a_manifest_it_cannot_read_and_reading_commands_refuse_a_missing_store(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from genpi.cli.main import main
    from genpi.store import open_store

    open_store(str(tmp_path / "store")).put_json("adapters/shell/v1/manifest.json", {"prompt": ["x"]})
    assert main(["verify", "--store.url", str(tmp_path / "store")]) == 1
    out = capsys.readouterr().out.splitlines()
    assert "adapters/shell/v1/manifest.json is not an adapter manifest" in out[0] and out[-1].endswith("1 problems")
    for command in (["ls"], ["verify"], ["status"], ["report"], ["serve", "--check"]):
        assert main([*command, "--store.url", str(tmp_path / "typo")]) == 2
        err = capsys.readouterr().err
        assert f"store folder {tmp_path / 'typo'} does not exist" in err and err.count("\n") == 1, (command, err)


def test_a_flag_mistake_is_one_line_with_the_nearest_flag(capsys: pytest.CaptureFixture) -> None:
    from genpi.cli.main import main

    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0 and capsys.readouterr().out.startswith("genpi 0.")

    for argv, hint in (
        (["--train.lora_r", "8"], "did you mean --train.lora-r?"),
        (["--prompt", "x"], "did you mean --prompts?"),  # never taken for --prompts
        (["--train.lr", "1e-4"], "did you mean --train.learning-rate?"),  # by its initials
        (["ls", "--store.ulr", "x"], "did you mean --store.url?"),
    ):
        with pytest.raises(SystemExit) as caught:
            main(argv)
        err = capsys.readouterr().err
        assert caught.value.code == 2 and hint in err and err.count("\n") == 1 and "--help" in err, err
    with pytest.raises(SystemExit):
        main(["--eval.mt", "3"])  # max-tokens or max-turns: no guess
    assert "did you mean" not in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_a_reader_that_leaves_early_gets_no_traceback(tmp_path: Path) -> None:
    """``genpi ... | head -1``: the reader closes the pipe; genpi stops quietly, as a SIGPIPE'd command."""
    (tmp_path / "store").mkdir()
    for argv in (["ls", "--store.url", str(tmp_path / "store")], ["--print-config"]):
        proc = subprocess.Popen(
            [sys.executable, "-c", "from genpi.cli.main import entrypoint; entrypoint()", *argv],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # before genpi writes a byte
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=60) == 141 and "Traceback" not in err and "BrokenPipe" not in err, err
