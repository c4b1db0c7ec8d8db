"""`genpi serve` before and as it starts: replicas that cannot be placed, and what a client can ask for now."""

from __future__ import annotations

from pathlib import Path

import pytest

from genpi.cli.serve import check_fits, served_now
from genpi.config import load_config
from genpi.errors import GenPIError
from genpi.models import TINY
from genpi.serve.catalog import Catalog
from genpi.store import open_store
from tests.serve.support import prompt_spec, publish, random_adapter


def test_an_empty_store_says_nothing_is_served_yet(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "store"))
    line = served_now(Catalog(store, [], TINY, refresh_s=2.0))
    assert line.startswith("nothing to serve yet") and store.url in line and "(2 s)" in line


def test_models_by_what_answers_them(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "store"))
    publish(store, prompt_spec("shell-agent"), "v1", random_adapter(tmp_path / "shell", seed=1), probes=False)
    given = [prompt_spec("deploy-now")]
    line = served_now(Catalog(store, given, TINY, refresh_s=2.0))
    assert line == "models: shell-agent (its adapter); deploy-now (the prompt prepended)"
    # A server of another base model serves the stored prompt's text instead of the adapter.
    other = served_now(Catalog(store, given, "smollm2-135m-instruct", refresh_s=2.0))
    assert other == "models: deploy-now, shell-agent (the prompt prepended)"


def test_replicas_a_local_cluster_cannot_place_are_refused_instead_of_waiting_for_ever() -> None:
    three = load_config("local", overrides={"serve.replicas": 3, "serve.num_cpus": 1})
    with pytest.raises(GenPIError, match="ask for 3 CPU in all; the local Ray cluster has 2: lower --serve.num-cpus"):
        check_fits(three, {"CPU": 2.0})
    check_fits(three, {"CPU": 3.0})
    gpu = load_config("local", overrides={"serve.num_gpus": 1})
    with pytest.raises(GenPIError, match="serve.num_gpus 1 ask for 1 GPU in all; the local Ray cluster has 0"):
        check_fits(gpu, {"CPU": 16.0})


def test_a_cpu_slow_at_bf16_is_named_before_the_server_starts(tmp_path: Path, monkeypatch, capsys) -> None:
    import platform
    import socket

    import torch

    from genpi.cli.main import main

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    with socket.socket() as taken:  # the server stops at its port, after the warning
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["serve", "--store.url", str(tmp_path), "--serve.host", "127.0.0.1", "--serve.port", str(port)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "AVX2 and no AVX-512" in err and "--models.target.dtype float32" in err and f"serve.port {port}" in err
        assert main([*argv, "--models.target.dtype", "float32"]) == 2
        assert "AVX-512" not in capsys.readouterr().err
