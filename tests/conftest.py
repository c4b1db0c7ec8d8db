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


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def any_store(request: pytest.FixtureRequest, tmp_path: Path):
    """An empty artifact store of each backend: a local folder, then a bucket on the test S3 server."""
    from genpi.store import open_store

    if request.param == "local":
        return open_store(str(tmp_path / "artifacts"))
    server: S3Server = request.getfixturevalue("s3_env")
    return open_store(f"s3://{server.create_bucket()}/runs", endpoint_url=server.endpoint_url)
