"""The app serving from the SeaweedFS S3 store: adapters and the prompt's text come from S3."""

from __future__ import annotations

import os
from pathlib import Path

import openai
import pytest

from genpi import ray_runtime
from genpi.store import open_store
from tests.s3_server import S3Server
from tests.serve.support import prompt_spec, publish, random_adapter, serve_config, start_app

pytestmark = [pytest.mark.timeout(240), pytest.mark.s3]

SHELL = prompt_spec("shell-agent")


@pytest.fixture(scope="module")
def base_url(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory):
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")}
    # set before Ray starts: the replicas inherit them, as a deployment's environment would give them
    os.environ.update(
        AWS_ACCESS_KEY_ID=s3_server.access_key, AWS_SECRET_ACCESS_KEY=s3_server.secret_key, AWS_REGION=s3_server.region
    )
    url = f"s3://{s3_server.create_bucket()}/artifacts"
    store = open_store(url, endpoint_url=s3_server.endpoint_url)
    root: Path = tmp_path_factory.mktemp("s3serve")
    publish(store, SHELL, "v1", random_adapter(root / "shell", seed=1))
    cfg = serve_config(url, ray_runtime.free_port(), **{"store.endpoint_url": s3_server.endpoint_url})
    try:
        yield from start_app(cfg, [])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_serves_an_adapter_from_s3(base_url: str) -> None:
    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == ["shell-agent"]
    raw = client.chat.completions.with_raw_response.create(
        model="shell-agent", messages=[{"role": "user", "content": "List /tmp."}], temperature=0, max_tokens=8
    )
    assert raw.headers["x-genpi-mode"] == "adapter" and raw.parse().choices[0].message.content
    card = client.models.list().data[0].model_dump()
    assert card["parity"] == "passed"
