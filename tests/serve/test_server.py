"""The app on the tiny model, driven with the stock ``openai`` client over loopback.

One private Ray cluster and one app for the module. Two prompts have published adapters, one
(``deploy-now``) is given only as a prompt file; the rest is published while the app runs.
Adapters are float32 on the tiny model, where mixed-adapter and single-adapter batches give the
same greedy answers bit for bit.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import openai
import pytest
import requests

from genpi import ray_runtime, registry
from genpi.store import open_store
from tests.serve.support import (
    HELLO,
    KEY,
    ask,
    prompt_spec,
    publish,
    random_adapter,
    replica_stats,
    serve_config,
    start_app,
    streamed_as_whole,
    two_published,
    wait_for,
)

pytestmark = pytest.mark.timeout(240)

SHELL, NEW = prompt_spec("shell-agent"), prompt_spec("deploy-now")


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return two_published(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def base_url(store_dir: Path):
    cfg = serve_config(
        str(store_dir / "store"), ray_runtime.free_port(), **{"serve.api_key": KEY, "serve.max_body_kib": 64}
    )
    yield from start_app(cfg, [NEW])


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=120)


def test_health_and_models(base_url: str, client: openai.OpenAI) -> None:
    assert requests.get(base_url.removesuffix("/v1") + "/health").json() == {"status": "ok"}
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) >= {"shell-agent", "sql-agent", "deploy-now"}
    shell = cards["shell-agent"].model_dump()
    assert shell["version"] == "v1" and shell["mode"] == "adapter" and shell["retention"] == {"format_valid": 0.9}
    assert shell["gap_closed"] == {"nll": 0.6} and shell["base_model"] == "tiny-random-llama"
    assert cards["deploy-now"].model_dump()["mode"] == "prompt"
    # One card, as `client.models.retrieve` asks for it: by name, or one pinned version.
    assert client.models.retrieve("shell-agent").model_dump() == shell
    pinned = client.models.retrieve("shell-agent@v1").model_dump()
    assert pinned["id"] == "shell-agent@v1" and pinned["version"] == "v1" and pinned["mode"] == "adapter"
    assert client.models.retrieve("deploy-now").model_dump()["mode"] == "prompt"
    for unknown in ("no-such-prompt", "shell-agent@v99"):
        with pytest.raises(openai.NotFoundError) as missing:
            client.models.retrieve(unknown)
        assert missing.value.body["code"] == "model_not_found"


def test_chat_with_the_adapter_reports_mode_and_tokens_saved(client: openai.OpenAI) -> None:
    raw = ask(client, "shell-agent")
    reply = raw.parse()
    assert raw.headers["x-genpi-mode"] == "adapter" and reply.model_extra["genpi_mode"] == "adapter"
    assert reply.choices[0].message.content and reply.choices[0].finish_reason in ("stop", "length")
    usage = reply.usage.model_dump()
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 12
    assert usage["prompt_tokens_saved"] > 100  # the prompt the client did not send
    assert reply.system_fingerprint == "shell-agent@v1"
    assert ask(client, "shell-agent@v1").parse().choices[0].message.content == reply.choices[0].message.content


def test_streaming_equals_the_whole_reply_and_ends_with_usage(client: openai.OpenAI) -> None:
    streamed_as_whole(client, "sql-agent")
    raw = _post(
        str(client.base_url).rstrip("/"), {"model": "sql-agent", "messages": HELLO, "stream": True, "max_tokens": 4}
    )
    assert raw.headers["x-genpi-mode"] == "adapter" and raw.text.endswith("data: [DONE]\n\n")


def test_two_prompts_answer_differently_and_seeded_sampling_repeats(client: openai.OpenAI) -> None:
    shell, sql = (
        ask(client, m, max_tokens=16).parse().choices[0].message.content for m in ("shell-agent", "sql-agent")
    )
    assert shell != sql
    sampled = [
        ask(client, "shell-agent", temperature=1.0, seed=7, max_tokens=16).parse().choices[0].message.content
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]


def test_requests_together_share_one_batch_and_equal_single_answers(client: openai.OpenAI) -> None:
    requests = [
        (m, [{"role": "user", "content": f"task {k}"}])
        for k, m in enumerate(["shell-agent", "sql-agent", "deploy-now"] * 2)
    ]
    alone = [ask(client, m, msgs).parse().choices[0].message.content for m, msgs in requests]
    before = replica_stats()["batches"]
    together: list[str | None] = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def run(k: int) -> None:
        barrier.wait()
        together[k] = ask(client, *requests[k]).parse().choices[0].message.content

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
    assert replica_stats()["batches"] - before < len(requests)  # mixed adapters (and the prompt) shared calls


def test_prompt_mode_first_then_the_adapter_once_published(store_dir: Path, client: openai.OpenAI) -> None:
    raw = ask(client, "deploy-now")
    reply = raw.parse()
    assert raw.headers["x-genpi-mode"] == "prompt" and reply.usage.prompt_tokens > 100
    assert reply.usage.prompt_tokens_details.cached_tokens > 100  # the prompt's KV, computed once
    assert reply.usage.model_dump()["prompt_tokens_saved"] == 0
    publish(open_store(str(store_dir / "store")), NEW, "v1", random_adapter(store_dir / "new", seed=3))
    started = time.monotonic()
    mode = wait_for(lambda: ask(client, "deploy-now").headers["x-genpi-mode"] == "adapter", timeout=10)
    assert mode, "the published adapter was not served within 10 s"
    assert time.monotonic() - started < 10


def test_a_prompt_the_job_saw_without_a_passing_adapter_is_served_in_prompt_mode(
    store_dir: Path, client: openai.OpenAI
) -> None:
    failed = prompt_spec("gate-failed")
    registry.record_prompt(open_store(str(store_dir / "store")), failed)
    time.sleep(0.6)
    raw = ask(client, "gate-failed")
    assert raw.headers["x-genpi-mode"] == "prompt" and raw.parse().system_fingerprint.startswith("prompt:gate-failed@")


def test_an_adapter_published_while_serving_is_served_without_restart(store_dir: Path, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        ask(client, "web-agent")
    publish(open_store(str(store_dir / "store")), prompt_spec("web-agent"), "v1", random_adapter(store_dir / "web", 4))
    assert wait_for(lambda: "web-agent" in {m.id for m in client.models.list().data}, timeout=10)
    assert ask(client, "web-agent").headers["x-genpi-mode"] == "adapter"


def test_parity_check_refuses_a_tampered_or_inert_version(store_dir: Path, client: openai.OpenAI) -> None:
    store = open_store(str(store_dir / "store"))
    good = ask(client, "shell-agent@v1").parse().choices[0].message.content
    # v2's probes were recorded from another adapter than the one published: not served, v1 answers
    publish(store, SHELL, "v2", random_adapter(store_dir / "shell2", seed=5), probes_from=store_dir / "sql")
    time.sleep(0.6)
    with pytest.raises(openai.InternalServerError) as refused:
        ask(client, "shell-agent@v2")
    assert "parity check failed" in refused.value.body["message"]
    assert ask(client, "shell-agent").parse().choices[0].message.content == good
    card = next(m for m in client.models.list().data if m.id == "shell-agent").model_dump()
    assert card["version"] == "v1" and "parity check failed" in card["rejected"]["shell-agent@v2"]
    # an adapter that loads and changes nothing
    publish(store, SHELL, "v3", random_adapter(store_dir / "inert", seed=6, zero=True))
    with pytest.raises(openai.InternalServerError) as inert:
        ask(client, "shell-agent@v3")
    assert "changes nothing" in inert.value.body["message"]
    # files altered after publishing
    publish(store, SHELL, "v4", random_adapter(store_dir / "shell4", seed=7))
    store.put_bytes("adapters/shell-agent/v4/adapter_model.safetensors", b"altered")
    with pytest.raises(openai.InternalServerError) as altered:
        ask(client, "shell-agent@v4")
    assert "differs from the digest" in altered.value.body["message"]
    assert ask(client, "shell-agent").parse().choices[0].message.content == good
    assert ask(client, "shell-agent@v1").parse().model_extra["genpi_mode"] == "adapter"
    card = next(m for m in client.models.list().data if m.id == "shell-agent").model_dump()
    assert card["parity"] == "passed"


def test_least_recently_used_adapters_are_unloaded(store_dir: Path, client: openai.OpenAI) -> None:
    store = open_store(str(store_dir / "store"))
    specs = [prompt_spec(f"lru-{k}") for k in range(4)]
    for k, spec in enumerate(specs):
        publish(store, spec, "v1", random_adapter(store_dir / f"lru{k}", seed=10 + k), probes=False)
    time.sleep(0.6)
    first = ask(client, "lru-0").parse().choices[0].message.content
    for spec in specs[1:]:
        ask(client, spec.name)
    stats = replica_stats()
    assert len(stats["held"]) <= 3 and stats["adapters"] <= 3 and "lru-0@v1" not in stats["held"]
    assert ask(client, "lru-0").parse().choices[0].message.content == first  # reloaded, same answer
    card = next(m for m in client.models.list().data if m.id == "lru-0").model_dump()
    assert card["parity"] == "unchecked (no probes recorded)"


def test_sixteen_clients_over_four_adapters(client: openai.OpenAI) -> None:
    models = ["shell-agent", "sql-agent", "deploy-now", "web-agent"]
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            for turn in range(2):
                reply = ask(client, models[k % 4], [{"role": "user", "content": f"client {k} turn {turn}"}]).parse()
                assert reply.choices[0].message.content is not None
        except BaseException as e:  # collected: the test fails with it below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


def _post(base_url: str, body: object, key: str | None = KEY, raw: bytes | None = None) -> requests.Response:
    headers = {"content-type": "application/json"} | ({"authorization": f"Bearer {key}"} if key else {})
    content = raw if raw is not None else json.dumps(body).encode()
    return requests.post(f"{base_url}/chat/completions", data=content, headers=headers, timeout=60)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": "shell-agent", "messages": "hello"}, "messages"),
        ({"model": "shell-agent", "messages": HELLO, "temperature": "hot"}, "temperature"),
        ({"model": "shell-agent", "messages": HELLO, "max_tokens": 0}, "max_tokens"),
        ({"model": "shell-agent", "messages": []}, "messages"),
        ({"model": "shell-agent", "messages": [{"role": "user", "content": "  "}]}, "messages[0].content"),
        ({"model": "shell-agent", "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"model": "shell-agent", "messages": HELLO, "n": 2}, "n"),
        (
            {"model": "shell-agent", "messages": HELLO, "tools": [{"type": "function", "function": {"name": "f"}}]},
            "tools",
        ),
        ({"model": "shell-agent", "messages": HELLO, "logprobs": True}, "logprobs"),
        ({"model": "shell-agent", "messages": HELLO, "response_format": {"type": "json_object"}}, "response_format"),
        ({"model": "shell-agent", "messages": HELLO, "frobnicate": 1}, "frobnicate"),
        ({"messages": HELLO}, "model"),
        ({"model": "shell-agent", "messages": HELLO, "n": 0}, "n"),
        ({"model": "shell-agent", "messages": HELLO, "stop": 5}, "stop"),  # no union tag (stop.str) in the name
        ({"model": "shell-agent", "messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, "stop"),  # 4 at most
        ({"model": "shell-agent", "messages": HELLO, "stop": "a" * 65}, "stop"),  # its check's tables grow with it
        ({"model": "shell-agent", "messages": HELLO, "stop": ["\ud800"]}, "stop"),
        ({"model": "shell-agent", "messages": [{"role": "user", "content": "a\udc80b"}]}, "messages[0].content"),
        ({"model": "shell-agent", "messages": [{"role": "user", "content": None}]}, "messages[0].content"),
        (  # a list in a str | list field is judged as a list: the missing text is named, not "a valid string"
            {"model": "shell-agent", "messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "messages[0].content[0].text",
        ),
    ],
)
def test_bad_input_is_a_400_naming_the_parameter(base_url: str, body: dict, param: str) -> None:
    response = _post(base_url, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_an_image_part_is_refused_by_its_type(base_url: str) -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    content = [{"type": "text", "text": "what is this?"}, image]
    response = _post(base_url, {"model": "shell-agent", "messages": [{"role": "user", "content": content}]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "messages[0].content" and "part 1 is of type 'image_url'" in error["message"]


def test_malformed_json_oversized_unknown_model_and_context(base_url: str, client: openai.OpenAI) -> None:
    assert _post(base_url, None, raw=b'{"model": "shell-agent", "messages": [').status_code == 400
    big = _post(base_url, {"model": "shell-agent", "messages": [{"role": "user", "content": "x" * 70_000}]})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    with pytest.raises(openai.NotFoundError) as unknown:
        ask(client, "no-such-prompt")
    assert unknown.value.body["code"] == "model_not_found" and "shell-agent" in unknown.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        ask(client, "shell-agent@v99")
    long = [{"role": "user", "content": "word " * 5000}]
    with pytest.raises(openai.BadRequestError) as too_long:
        ask(client, "shell-agent", long)
    assert too_long.value.body["code"] == "context_length_exceeded"
    assert requests.get(f"{base_url}/nothing-here").json()["error"]["type"] == "not_found_error"


def test_odd_but_valid_requests_answer_and_bad_names_and_bodies_are_4xx(
    base_url: str, client: openai.OpenAI, store_dir: Path
) -> None:
    greedy = ask(client, "shell-agent", max_tokens=4).parse().choices[0].message.content
    tiny = ask(client, "shell-agent", max_tokens=4, temperature=1e-39)  # greedy, as vLLM reads it
    assert tiny.parse().choices[0].message.content == greedy
    nulls = {"model": "shell-agent", "messages": HELLO, "max_tokens": 4, "temperature": None, "top_p": None, "n": None}
    assert _post(base_url, {**nulls, "stream": None}).status_code == 200  # null means the default, as in OpenAI's API
    for model in ("shell-agent@..", "..@v1", "shell-agent@a\\b", "shell-agent@" + "v" * 300):
        response = _post(base_url, {"model": model, "messages": HELLO})
        assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found", response.text
        assert len(response.text) < 1000 and str(store_dir) not in response.text
    deep = b'{"model": "shell-agent", "messages": ' + b"[" * 20_000
    huge = b'{"model": "shell-agent", "messages": [], "seed": ' + b"9" * 5000 + b"}"
    for raw in (deep, huge):
        response = _post(base_url, None, raw=raw)
        assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"], response.text


def test_the_api_key_is_required(base_url: str) -> None:
    for key in (None, "sk-wrong"):
        response = _post(base_url, {"model": "shell-agent", "messages": HELLO}, key=key)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert requests.get(f"{base_url}/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base_url, api_key="sk-wrong", max_retries=0).models.list()


def test_metrics_reach_the_prometheus_endpoint_by_prompt_and_mode(client: openai.OpenAI) -> None:
    import ray

    ask(client, "shell-agent")
    port = ray.nodes()[0]["MetricsExportPort"]
    wanted = (
        "ray_genpi_requests",
        "ray_genpi_prompt_tokens_saved",
        "ray_genpi_request_latency_s",
        "ray_genpi_adapter_loads",
    )

    def scrape() -> list[str]:
        try:
            body = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        except requests.RequestException:
            return []
        lines = [line for line in body.splitlines() if line.startswith("ray_genpi")]
        return lines if all(any(line.startswith(w) for line in lines) for w in wanted) else []

    lines = wait_for(scrape, timeout=90)
    assert lines, f"no genpi series on :{port}/metrics"
    assert any(
        line.startswith("ray_genpi_requests") and 'prompt="shell-agent"' in line and 'mode="adapter"' in line
        for line in lines
    )
    assert any(line.startswith("ray_genpi_adapter_loads") and 'prompt="shell-agent"' in line for line in lines)


def test_a_replica_dying_mid_stream_ends_the_stream_with_an_error_event(base_url: str) -> None:
    """Last in the module: Serve replaces the killed replica."""
    import ray

    body = {"model": "shell-agent", "messages": HELLO, "max_tokens": 1500, "temperature": 0, "stream": True}
    headers = {"authorization": f"Bearer {KEY}"}
    events: list[str] = []
    with requests.post(f"{base_url}/chat/completions", json=body, headers=headers, stream=True, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines(decode_unicode=True):
            if not line:
                continue
            events.append(line)
            if len(events) == 2:  # the role chunk, then the first text: the reply is under way
                replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "ModelServer" in a["name"]]
                for actor in replicas:
                    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]))
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["type"] == "server_error" and error["message"]
