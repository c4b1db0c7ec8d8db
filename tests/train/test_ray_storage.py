"""Ray Train's storage for a run is the run's folder in the store, on S3 too, with the endpoint
given only the way a user sets it for boto3 (``AWS_ENDPOINT_URL``)."""

from __future__ import annotations

import pytest

from genpi.config import load_config
from genpi.store import open_store
from genpi.train.ray_run import ray_storage
from tests.fakes import mini_spec
from tests.s3_server import S3Server

pytestmark = [pytest.mark.s3, pytest.mark.timeout(120)]


def test_ray_storage_on_s3_reads_the_endpoint_from_the_environment(
    s3_env: S3Server, aws_env: pytest.MonkeyPatch
) -> None:
    bucket = s3_env.create_bucket()
    aws_env.setenv("AWS_ENDPOINT_URL", s3_env.endpoint_url)
    url = f"s3://{bucket}/genpi"
    store = open_store(url)  # the endpoint only in the environment, as cluster/README.md tells users
    cfg = load_config("local", overrides={"store.url": url})
    assert cfg.store.endpoint_url == ""
    path, filesystem = ray_storage(cfg, store, mini_spec(), "attempt-1")
    assert path.startswith(f"{bucket}/genpi/prompts/")
    with filesystem.open_output_stream(f"{path}/probe.txt") as out:  # what Ray Train writes its checkpoints with
        out.write(b"checkpoint")
    assert store.get_bytes(f"{path.split('/', 2)[2]}/probe.txt") == b"checkpoint"
