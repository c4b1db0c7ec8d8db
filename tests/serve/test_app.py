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
    with pytest.raises(ConfigError, match="serve.max_adapters"):
        build_app({"serve.max_adapters": "0"})
