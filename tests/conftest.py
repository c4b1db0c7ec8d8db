"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest

from tests.s3_server import S3Server, s3_server  # noqa: F401  (session SeaweedFS S3 server)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """Hide the machine's AWS settings (env, ~/.aws, instance metadata) from boto3."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return monkeypatch


@pytest.fixture
def s3_env(aws_env: pytest.MonkeyPatch, s3_server: S3Server) -> S3Server:
    """The test S3 server, with its credentials in the environment as a user would set them."""
    aws_env.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    aws_env.setenv("AWS_REGION", s3_server.region)
    return s3_server
