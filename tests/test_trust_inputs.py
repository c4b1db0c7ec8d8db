"""Trust: what the job logs, and bad input, never give away more than one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.s3_server import S3Server

ROOT = Path(__file__).resolve().parents[1]

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
    result = subprocess.run([sys.executable, "-c", VERBOSE_RUN, "-v", "--prompts", str(ROOT / "prompts"),
                             "--store.url", url, "--store.endpoint-url", s3_env.endpoint_url],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                            timeout=60)
    out = result.stdout + result.stderr
    assert result.returncode == 2 and "stopped before Ray" in out, out[-2000:]
    assert f"store {url}" in out  # it got as far as the store
    assert "Authorization" not in out and s3_env.access_key not in out and "x-amz" not in out.lower()
