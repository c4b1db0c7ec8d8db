"""The artifact store: the same behaviour tests on a local folder and on a real S3 server."""

from __future__ import annotations

import os
import pickle
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from genpi.errors import ArtifactNotFound, StoreError
from genpi.store import ArtifactStore, LocalStore, S3Store, open_store
from genpi.store.base import TEMP_SUFFIX
from tests.s3_server import S3Server

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def store(any_store: ArtifactStore) -> ArtifactStore:
    """An empty store of each backend (``any_store`` in conftest.py)."""
    return any_store


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- behaviour shared by both backends -------------------------------------------------


def test_round_trips(store: ArtifactStore) -> None:
    store.put_bytes("r/bytes.bin", bytes(range(256)))
    store.put_text("r/text.txt", "héllo\nwörld ✓")
    obj = {"name": "prompt", "n": 3, "nested": {"list": [1, 2.5, None, True]}, "u": "ü"}
    store.put_json("r/obj.json", obj)
    records = [{"i": i, "s": f"line {i}\u2028with separator"} for i in range(3)]
    store.put_jsonl("r/records.jsonl", records)
    store.put_jsonl("r/empty.jsonl", [])

    assert store.get_bytes("r/bytes.bin") == bytes(range(256))
    assert store.get_text("r/text.txt") == "héllo\nwörld ✓"
    assert store.get_json("r/obj.json") == obj
    assert store.get_jsonl("r/records.jsonl") == records
    assert store.get_jsonl("r/empty.jsonl") == []
    raw = store.get_bytes("r/obj.json").decode("utf-8")
    assert '\n  "name": "prompt"' in raw and '"ü"' in raw  # pretty, not ASCII-escaped


def test_list_keys_folder_semantics_and_sorting(store: ArtifactStore) -> None:
    keys = ["a/b/sub/2.txt", "a/b/1.txt", "a/bc/3.txt", "a/b.json", "z.txt", "B.txt"]
    for key in keys:
        store.put_text(key, key)
    assert store.list_keys() == sorted(keys)
    assert store.list_keys("a/b") == ["a/b/1.txt", "a/b/sub/2.txt"]
    assert store.list_keys("a/b/") == ["a/b/1.txt", "a/b/sub/2.txt"]
    assert store.list_keys("a") == ["a/b.json", "a/b/1.txt", "a/b/sub/2.txt", "a/bc/3.txt"]
    assert store.list_keys("a/b.json") == []  # a key is not a folder
    assert store.list_keys("missing") == []


def test_overwrite_and_exists(store: ArtifactStore) -> None:
    assert not store.exists("k/v.txt")
    store.put_text("k/v.txt", "first, and longer")
    assert store.exists("k/v.txt")
    store.put_text("k/v.txt", "second")
    assert store.get_text("k/v.txt") == "second"
    assert store.list_keys() == ["k/v.txt"]
    assert not store.exists("k")  # a folder is not a key


def test_delete_prefix(store: ArtifactStore) -> None:
    for key in ["a/b/1", "a/b/deep/2", "a/bc/3", "a/b.json", "c"]:
        store.put_text(key, "x")
    store.delete_prefix("a/b")
    assert store.list_keys() == ["a/b.json", "a/bc/3", "c"]
    assert not store.exists("a/b/1")
    store.delete_prefix("never/written")  # not an error
    with pytest.raises(StoreError, match="whole store"):
        store.delete_prefix("")
    assert store.list_keys() == ["a/b.json", "a/bc/3", "c"]


def test_upload_and_download_dir(store: ArtifactStore, tmp_path: Path) -> None:
    source = tmp_path / "adapter"
    files = {
        "adapter_config.json": b'{"r": 8}',
        "adapter_model.safetensors": os.urandom(300_000),
        "sub/deeper/notes.txt": "ünïcode".encode(),
        "empty.bin": b"",
    }
    for rel, data in files.items():
        (source / rel).parent.mkdir(parents=True, exist_ok=True)
        (source / rel).write_bytes(data)

    store.upload_dir(source, "adapters/p1")
    assert store.list_keys("adapters/p1") == sorted(f"adapters/p1/{rel}" for rel in files)

    dest = store.download_dir("adapters/p1", tmp_path / "copy")
    assert dest == tmp_path / "copy"
    got = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert got == files

    with pytest.raises(ArtifactNotFound, match="adapters/none"):
        store.download_dir("adapters/none", tmp_path / "none")
    with pytest.raises(StoreError, match="not a folder"):
        store.upload_dir(tmp_path / "no-such-dir", "x")


def test_large_file_round_trip(store: ArtifactStore, tmp_path: Path) -> None:
    # above the S3 multipart threshold (16 MiB), so S3 uploads it in parts
    big = tmp_path / "big.bin"
    data = os.urandom(17 << 20)
    big.write_bytes(data)
    store.put_file("weights/big.bin", big)
    out = store.get_file("weights/big.bin", tmp_path / "out" / "big.bin")
    assert out.read_bytes() == data
    assert store.list_keys("weights") == ["weights/big.bin"]


def test_done_markers(store: ArtifactStore) -> None:
    assert not store.is_done("stage/abc")
    with pytest.raises(ArtifactNotFound):
        store.done_info("stage/abc")
    store.put_jsonl("stage/abc/out.jsonl", [{"x": 1}])
    store.mark_done("stage/abc", {"records": 1, "model": "tiny"})
    assert store.is_done("stage/abc")
    info = store.done_info("stage/abc")
    assert info["records"] == 1 and info["model"] == "tiny"
    assert info["finished_at"].startswith("20")
    assert store.list_keys("stage/abc") == ["stage/abc/_SUCCESS", "stage/abc/out.jsonl"]
    store.mark_done("stage/plain")
    assert store.done_info("stage/plain") == {"finished_at": store.done_info("stage/plain")["finished_at"], "files": {}}


def test_missing_key_raises_artifact_not_found(store: ArtifactStore, tmp_path: Path) -> None:
    with pytest.raises(ArtifactNotFound) as caught:
        store.get_bytes("no/such/key.json")
    assert store.location("no/such/key.json") in str(caught.value)
    assert store.url in str(caught.value)
    for read in (store.get_text, store.get_json, store.get_jsonl):
        with pytest.raises(ArtifactNotFound):
            read("no/such/key.json")
    with pytest.raises(ArtifactNotFound):
        store.get_file("no/such/key.json", tmp_path / "out" / "key.json")
    assert not (tmp_path / "out" / "key.json").exists()


def test_a_document_genpi_cannot_read_names_its_file(store: ArtifactStore) -> None:
    store.put_text("a/doc.json", '{"n": ' + "9" * 5000 + "}")  # more digits than Python reads
    store.put_text("a/rows.jsonl", '{"n": 1}\n{"n": ' + "9" * 5000 + "}\n")
    with pytest.raises(StoreError, match="a/doc.json is not valid JSON"):
        store.get_json("a/doc.json")
    with pytest.raises(StoreError, match="a/rows.jsonl line 2 is not valid JSON"):
        store.get_jsonl("a/rows.jsonl")
    store.put_json("a/report.json", {"n": 1})
    with pytest.raises(StoreError, match=r"a/report.json is not a report genpi can read \(no 'rows'\); rewrite it"):
        with store.reading("a/report.json", "a report", "rewrite it"):
            store.get_json("a/report.json")["rows"]


@pytest.mark.parametrize(
    "bad_key",
    ["", "/abs", "a//b", "a/../b", "..", "a/./b", "a\\b", "a/", f"x/y{TEMP_SUFFIX}"],
)
def test_invalid_keys_are_rejected(store: ArtifactStore, bad_key: str) -> None:
    for call in (
        lambda: store.put_bytes(bad_key, b"x"),
        lambda: store.get_bytes(bad_key),
        lambda: store.exists(bad_key),
    ):
        with pytest.raises(StoreError) as caught:
            call()
        assert repr(bad_key) in str(caught.value) and store.url in str(caught.value)
    assert store.list_keys() == []


@pytest.mark.parametrize("bad_prefix", ["/a", "a//b", "../a", "a\\b"])
def test_invalid_prefixes_are_rejected(store: ArtifactStore, bad_prefix: str) -> None:
    for call in (store.list_keys, store.delete_prefix, store.is_done):
        with pytest.raises(StoreError, match="invalid prefix"):
            call(bad_prefix)


def test_failing_producer_keeps_old_content(store: ArtifactStore) -> None:
    store.put_jsonl("data/train.jsonl", [{"old": True}])

    def records() -> Iterator[dict]:
        yield {"new": 1}
        raise RuntimeError("generator died")

    with pytest.raises(RuntimeError, match="generator died"):
        store.put_jsonl("data/train.jsonl", records())
    assert store.get_jsonl("data/train.jsonl") == [{"old": True}]
    assert store.list_keys() == ["data/train.jsonl"]


def test_concurrent_reader_sees_whole_objects(store: ArtifactStore) -> None:
    versions = [bytes([i]) * 1_000_000 for i in range(2)]
    store.put_bytes("hot/obj.bin", versions[0])
    seen: list[bytes] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.append(store.get_bytes("hot/obj.bin"))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(10):
            store.put_bytes("hot/obj.bin", versions[i % 2])
    finally:
        stop.set()
        reader.join()
    assert seen and all(data in versions for data in seen)


def test_store_pickles(store: ArtifactStore) -> None:
    store.put_text("p.txt", "shipped to a worker")
    copy = pickle.loads(pickle.dumps(store))
    assert type(copy) is type(store) and copy.url == store.url
    assert copy.get_text("p.txt") == "shipped to a worker"


# -- local folder specifics ------------------------------------------------------------


def test_open_store_local_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    default = open_store()
    assert isinstance(default, LocalStore) and default.url == str(tmp_path / "artifacts")
    assert not (tmp_path / "artifacts").exists()  # created on the first write only
    default.put_text("a.txt", "x")
    assert (tmp_path / "artifacts" / "a.txt").read_text() == "x"
    assert open_store("rel/dir").url == str(tmp_path / "rel" / "dir")
    assert open_store(f"file://{tmp_path}/via-url").url == str(tmp_path / "via-url")
    assert default.location("a.txt") == str(tmp_path / "artifacts" / "a.txt")
    for bad in ["", "gs://bucket/x", "file://otherhost/x"]:
        with pytest.raises(StoreError):
            open_store(bad)


def test_local_replace_failure_keeps_old_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(tmp_path / "s")
    store.put_text("k.txt", "old")
    temp_paths: list[str] = []

    def failing_replace(src: str, dst: str) -> None:
        temp_paths.append(str(src))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(StoreError) as caught:
        store.put_text("k.txt", "new")
    assert store.location("k.txt") in str(caught.value) and "writable" in str(caught.value)
    monkeypatch.undo()

    assert store.get_text("k.txt") == "old"
    assert len(temp_paths) == 1 and temp_paths[0].endswith(TEMP_SUFFIX)
    assert not os.path.exists(temp_paths[0])
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["k.txt"]


def test_local_leftover_temp_files_are_hidden(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    store.put_text("d/k.txt", "x")
    # what a writer killed between write and rename leaves behind
    (tmp_path / "s" / "d" / f".k.txt.0123abcd{TEMP_SUFFIX}").write_text("partial")
    assert store.list_keys() == ["d/k.txt"]
    assert store.list_keys("d") == ["d/k.txt"]


def test_local_root_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(StoreError, match="is a file") as caught:
        open_store(str(tmp_path / "file"))
    assert str(tmp_path / "file") in str(caught.value)

    store = open_store(str(tmp_path / "file" / "below"))  # cannot be created later
    with pytest.raises(StoreError, match="cannot write") as caught:
        store.put_text("k.txt", "x")
    assert store.url in str(caught.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_local_root_not_writable(tmp_path: Path) -> None:
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o500)
    try:
        with pytest.raises(StoreError, match="writable") as caught:
            LocalStore(root).put_text("k.txt", "x")
        assert str(root) in str(caught.value)
    finally:
        root.chmod(0o700)


# -- S3 specifics and errors -----------------------------------------------------------


@pytest.mark.parametrize("url", ["s3://", "s3:///prefix", "s3://bucket//x", "s3://bucket/../x", "s3://bad bucket/x"])
def test_s3_malformed_urls(url: str) -> None:
    with pytest.raises(StoreError) as caught:
        open_store(url)
    assert "s3://" in str(caught.value)


def test_s3_no_credentials(aws_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(StoreError, match="no AWS credentials") as caught:
        open_store("s3://b/p", endpoint_url=f"http://127.0.0.1:{_closed_port()}")
    assert "s3://b/p" in str(caught.value) and "AWS_ACCESS_KEY_ID" in str(caught.value)


def test_s3_unreachable_endpoint(aws_env: pytest.MonkeyPatch) -> None:
    aws_env.setenv("AWS_ACCESS_KEY_ID", "key")
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    with pytest.raises(StoreError, match="cannot reach the S3 endpoint") as caught:
        open_store("s3://b/p", endpoint_url=endpoint)
    assert time.monotonic() - started < 15
    message = str(caught.value)
    assert endpoint in message and "s3://b/p" in message
    assert "--store.endpoint-url" in message and "AWS_ENDPOINT_URL" in message


@pytest.mark.s3
def test_s3_endpoint_and_region_from_environment(s3_env: S3Server, aws_env: pytest.MonkeyPatch) -> None:
    bucket = s3_env.create_bucket()
    aws_env.setenv("AWS_ENDPOINT_URL", s3_env.endpoint_url)
    store = open_store(f"s3://{bucket}")
    assert isinstance(store, S3Store) and store.url == f"s3://{bucket}"
    store.put_text("top.txt", "x")
    assert store.list_keys() == ["top.txt"]
    assert store.location("top.txt") == f"s3://{bucket}/top.txt"


@pytest.mark.s3
def test_s3_store_prefix_is_a_folder(s3_env: S3Server) -> None:
    bucket = s3_env.create_bucket()
    one = open_store(f"s3://{bucket}/one/", endpoint_url=s3_env.endpoint_url)
    other = open_store(f"s3://{bucket}/onetwo", endpoint_url=s3_env.endpoint_url)
    assert one.url == f"s3://{bucket}/one"
    one.put_text("k.txt", "1")
    other.put_text("k.txt", "2")
    assert one.list_keys() == ["k.txt"] and other.list_keys() == ["k.txt"]
    one.delete_prefix("k.txt")  # a key, not a folder: nothing to delete
    assert one.get_text("k.txt") == "1" and other.get_text("k.txt") == "2"
    keys = sorted(o["Key"] for o in s3_env.client.list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == ["one/k.txt", "onetwo/k.txt"]


@pytest.mark.s3
def test_s3_missing_bucket(s3_env: S3Server) -> None:
    with pytest.raises(StoreError, match="does not exist") as caught:
        open_store("s3://genpi-no-such-bucket/p", endpoint_url=s3_env.endpoint_url)
    message = str(caught.value)
    assert "s3://genpi-no-such-bucket/p" in message and "create it or fix the store URL" in message


@pytest.mark.s3
@pytest.mark.parametrize("wrong", ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"])
def test_s3_bad_credentials(s3_env: S3Server, aws_env: pytest.MonkeyPatch, wrong: str) -> None:
    bucket = s3_env.create_bucket()
    aws_env.setenv(wrong, "wrong-value")
    url = f"s3://{bucket}/p"
    with pytest.raises(StoreError, match="credentials rejected") as caught:
        open_store(url, endpoint_url=s3_env.endpoint_url)
    assert url in str(caught.value) and "AWS_ACCESS_KEY_ID" in str(caught.value)


def failing(error: Exception, calls: list):
    """A put_object that records its key and raises ``error``."""

    def put_object(**kwargs):
        calls.append(kwargs["Key"])
        raise error

    return put_object


@pytest.mark.s3
def test_s3_write_that_fails_for_a_passing_reason_is_retried(s3_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError

    from genpi.store import s3 as s3_module

    store = open_store(f"s3://{s3_env.create_bucket()}/runs", endpoint_url=s3_env.endpoint_url)
    clock = [0.0]  # a fake clock: the retry window passes without waiting
    monkeypatch.setattr(s3_module.time, "sleep", lambda seconds: clock.__setitem__(0, clock[0] + seconds))
    monkeypatch.setattr(s3_module.time, "monotonic", lambda: clock[0])
    real_put, calls = store._client.put_object, []

    def flaky_put(**kwargs):
        calls.append(kwargs["Key"])
        if len(calls) <= 2:
            raise EndpointConnectionError(endpoint_url=s3_env.endpoint_url)
        return real_put(**kwargs)

    monkeypatch.setattr(store._client, "put_object", flaky_put)
    store.put_text("a.txt", "kept")
    assert len(calls) == 3 and store.get_text("a.txt") == "kept"

    calls.clear()
    denied = ClientError(
        {"Error": {"Code": "AccessDenied", "Message": "no"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "PutObject"
    )
    monkeypatch.setattr(store._client, "put_object", failing(denied, calls))
    with pytest.raises(StoreError, match="credentials rejected"):
        store.put_text("b.txt", "x")
    assert len(calls) == 1  # not a passing failure: no second try

    calls.clear()
    started = clock[0]
    monkeypatch.setattr(
        store._client, "put_object", failing(EndpointConnectionError(endpoint_url=s3_env.endpoint_url), calls)
    )
    with pytest.raises(StoreError, match="cannot reach the S3 endpoint.*after 60 s of retries"):
        store.put_text("c.txt", "x")
    assert 8 <= len(calls) <= 12 and 50 <= clock[0] - started <= 60  # 0.5, 1, 2, 4, 8, 8, ... s apart for 60 s
