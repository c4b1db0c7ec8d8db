"""Tests for genpi.engines.environments: which interpreter runs the vLLM engine actors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from genpi.engines.environments import vllm_python
from genpi.errors import ModelError


def test_a_configured_interpreter_must_be_an_executable_file(tmp_path: Path) -> None:
    assert vllm_python(sys.executable) == sys.executable
    (tmp_path / "passwd").write_text("root:x:0:0\n")
    for path in (tmp_path / "passwd", tmp_path / "missing", tmp_path):
        with pytest.raises(ModelError, match=f"the vLLM interpreter {path} is not an executable file"):
            vllm_python(str(path))
