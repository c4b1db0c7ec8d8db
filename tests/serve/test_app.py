"""The one application builder, as ``serve run genpi.serve:build_app k=v ...`` and a RayService call it."""

from __future__ import annotations

from pathlib import Path

import pytest
from ray.serve import Application

from genpi.errors import ConfigError
from genpi.models import TINY
from genpi.serve import build_app


def test_build_app_takes_config_flags_and_a_prompt_folder(tmp_path: Path) -> None:
    app = build_app(
        {"store.url": str(tmp_path), "models.target.name": TINY, "serve.max_adapters": "2", "prompts": "prompts"}
    )
    assert isinstance(app, Application)
    ingress = app._bound_deployment  # what Serve will start: the ingress bound to the model replicas
    model, settings = ingress.init_args
    assert ingress.name == "OpenAIServer" and model._bound_deployment.name == "ModelServer"
    assert settings["config"]["serve"]["max_adapters"] == 2 and settings["config"]["models"]["target"]["name"] == TINY
    assert [p["name"] for p in settings["prompts"]] == ["shell-agent", "support-agent", "web-shop-agent"]
    for key in ("serve.max_adapters", "--serve.max-adapters"):  # as serve run passes it, or written as a flag
        with pytest.raises(ConfigError, match="serve.max_adapters") as caught:
            build_app({key: "0"})
        assert "---" not in str(caught.value)


def test_the_backend_of_the_model_replicas(monkeypatch: pytest.MonkeyPatch) -> None:
    from genpi.config import load_config
    from genpi.engines import environments
    from genpi.errors import ModelError

    def cfg(**flags: object):
        return load_config("local", overrides={"store.url": "x", **flags})

    monkeypatch.setattr(environments, "vllm_python", lambda configured="": "/venv-vllm/bin/python")
    assert environments.serve_backend(cfg()) == ("hf", {})  # auto without a GPU: hf, vLLM installed or not
    assert environments.serve_backend(cfg(**{"serve.num_gpus": 1})) == (
        "vllm",
        {"py_executable": "/venv-vllm/bin/python"},
    )
    assert environments.serve_backend(cfg(**{"serve.backend": "vllm"}))[0] == "vllm"
    monkeypatch.setattr(environments, "vllm_python", lambda configured="": None)
    assert environments.serve_backend(cfg(**{"serve.num_gpus": 1})) == ("hf", {})
    with pytest.raises(ModelError, match="make install-vllm"):
        build_app({"store.url": "x", "models.target.name": TINY, "serve.backend": "vllm"})


def test_a_model_replica_whose_start_failed_goes_without_a_second_error() -> None:
    from genpi.serve.deployment import ModelServer

    replica = ModelServer.func_or_class.__new__(ModelServer.func_or_class)  # its __init__ raised: no batcher
    replica.__del__()
