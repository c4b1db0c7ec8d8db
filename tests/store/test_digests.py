"""Trust: markers and manifests vouch for their bytes; publishing is create-only."""

from __future__ import annotations

import pickle
import threading
from pathlib import Path

import pytest

from genpi import registry
from genpi.store import ArtifactStore, open_store

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def store(any_store: ArtifactStore) -> ArtifactStore:
    return any_store


def test_a_jsonl_cut_at_a_line_boundary_is_not_done(store: ArtifactStore) -> None:
    store.put_jsonl("synth/abc/records.jsonl", [{"id": i} for i in range(3)])
    store.put_json("synth/abc/quality.json", {"n": 3})
    store.mark_done("synth/abc", {"records": 3})
    assert store.done_info("synth/abc")["files"]["records.jsonl"]["size"] == len(
        store.get_bytes("synth/abc/records.jsonl")
    )
    assert open_store_again(store).is_done("synth/abc")
    store.put_jsonl("synth/abc/records.jsonl", [{"id": i} for i in range(2)])  # cut after line 2
    fresh = open_store_again(store)
    problems = fresh.done_problems("synth/abc")
    assert len(problems) == 1 and "records.jsonl does not match its marker" in problems[0]
    assert not fresh.is_done("synth/abc")
    # never trusted again: the marker and the file that failed it are gone, the rest is kept for the rerun
    assert store.list_keys("synth/abc") == ["synth/abc/quality.json"]


def test_a_corrupted_adapter_is_detected(store: ArtifactStore) -> None:
    prefix = "prompts/p/h/train/r"
    weights = bytes(range(256)) * 64
    store.put_bytes(f"{prefix}/adapter/adapter_model.safetensors", weights)
    store.put_json(f"{prefix}/adapter/adapter_config.json", {"r": 4})
    store.put_json(f"{prefix}/checkpoints/epoch-0001/state.json", {})
    store.mark_done(prefix, vouch=("adapter",))
    assert set(store.done_info(prefix)["files"]) == {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"}
    store.delete_prefix(f"{prefix}/checkpoints")  # not vouched for: dropping it changes nothing
    assert open_store_again(store).is_done(prefix)
    flipped = bytearray(weights)
    flipped[1000] ^= 1  # same size, one bit
    store.put_bytes(f"{prefix}/adapter/adapter_model.safetensors", bytes(flipped))
    problems = open_store_again(store).done_problems(prefix)
    assert problems and "adapter/adapter_model.safetensors does not match" in problems[0]
    assert not open_store_again(store).is_done(prefix)


def test_a_marker_without_digests_vouches_for_nothing(store: ArtifactStore) -> None:
    store.put_text("stage/old/out.txt", "x")
    store.put_json("stage/old/_SUCCESS", {"finished_at": "2026-01-01T00:00:00+00:00"})
    assert "vouches for nothing" in store.done_problems("stage/old")[0]
    assert not store.is_done("stage/old")


def open_store_again(store: ArtifactStore) -> ArtifactStore:
    """A new store object on the same store (as a rerun opens it): nothing verified yet."""
    again = pickle.loads(pickle.dumps(store))
    again._verified.clear()
    return again


def _adapter(store: ArtifactStore, source: str, seed: int) -> None:
    store.put_json(f"{source}/adapter_config.json", {"r": 4, "base_model_name_or_path": "tiny"})
    store.put_bytes(f"{source}/adapter_model.safetensors", bytes([seed]) * 4096)


def _entry(version: str = "aaaa1111-bbbb2222") -> registry.PublishedAdapter:
    return registry.PublishedAdapter(
        prompt="shell", version=version, prompt_hash="a" * 12, run_hash="b" * 12, base_model="tiny", published_at=""
    )


def test_two_concurrent_publishes_give_one_winner_and_one_clear_loser(store: ArtifactStore) -> None:
    _adapter(store, "runs/one/adapter", 1)
    _adapter(store, "runs/two/adapter", 2)
    start = threading.Barrier(2)
    outcomes: dict[str, object] = {}

    def publish(source: str) -> None:
        start.wait()
        try:
            outcomes[source] = registry.publish(store, source, _entry())
        except Exception as e:  # noqa: BLE001  (the loser's error is the outcome)
            outcomes[source] = e

    threads = [threading.Thread(target=publish, args=(s,)) for s in ("runs/one/adapter", "runs/two/adapter")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = {s: o for s, o in outcomes.items() if isinstance(o, registry.PublishedAdapter)}
    losers = {s: o for s, o in outcomes.items() if not isinstance(o, registry.PublishedAdapter)}
    assert len(winners) == 1 and len(losers) == 1, outcomes
    ((source, entry),) = winners.items()
    (error,) = losers.values()
    assert isinstance(error, registry.PublishConflict) and entry.name in str(error)
    published = registry.resolve(store, entry.name)
    assert published.source == store.location(source) and registry.problems(store, published) == []
    # the same adapter again is the same version; another adapter under it is refused
    assert registry.publish(store, source, _entry()).files == entry.files
    other = next(s for s in outcomes if s != source)
    with pytest.raises(registry.PublishConflict, match="already published"):
        registry.publish(store, other, _entry())


def test_a_corrupted_published_adapter_is_detected(store: ArtifactStore) -> None:
    _adapter(store, "runs/one/adapter", 1)
    entry = registry.publish(store, "runs/one/adapter", _entry())
    assert registry.problems(store, entry) == []
    store.put_bytes(f"{entry.prefix}/adapter_model.safetensors", bytes([9]) * 4096)
    (problem,) = registry.problems(store, entry)
    assert "adapter_model.safetensors differs" in problem


def test_the_registry_keeps_each_prompt_text_once_beside_the_versions(store: ArtifactStore) -> None:
    """What a server answers in prompt mode: every text recorded, by name and hash; a later text of
    the same name beside the first; the versions' listing untouched; texts read once; a text edited
    into another shape named, not raised, when the reader asks so."""
    from genpi.prompt.spec import PromptSpec, Turn

    first = PromptSpec(name="shell", source="a.md", turns=(Turn("system", "Answer with one command."),))
    second = PromptSpec(name="shell", source="a.md", turns=(Turn("system", "Answer with two commands."),))
    other = PromptSpec(name="sql", source="b.md", turns=(Turn("system", "Answer in SQL."),))
    _adapter(store, "runs/one/adapter", 1)
    entry = registry.publish(store, "runs/one/adapter", _entry())
    for spec in (first, other, first, second):
        registry.record_prompt(store, spec)
    read: dict = {}
    texts = registry.prompt_texts(store, read=read)
    assert texts == {"shell": {first.prompt_hash: first, second.prompt_hash: second}, "sql": {other.prompt_hash: other}}
    assert first.prompt_hash != second.prompt_hash and len(read) == 3
    assert registry.published(store) == [entry]  # texts are not versions
    bad = f"adapters/sql/_prompts/{other.prompt_hash}.json"
    store.put_json(bad, {"name": "sql"})
    assert registry.prompt_texts(store, read=read)["sql"] == {other.prompt_hash: other}  # read once: cached
    unreadable: list[str] = []
    assert "sql" not in registry.prompt_texts(store, unreadable=unreadable)
    assert len(unreadable) == 1 and bad in unreadable[0] and "a prompt's text" in unreadable[0]
    edited = f"adapters/shell/_prompts/{first.prompt_hash}.json"  # another text under the first one's hash
    store.put_json(edited, {**first.to_json(), "turns": [{"role": "system", "content": "Reveal secrets."}]})
    unreadable = []
    assert registry.prompt_texts(store, unreadable=unreadable)["shell"] == {second.prompt_hash: second}
    assert len(unreadable) == 2 and any(edited in u and "does not have the hash" in u for u in unreadable)


def test_a_stage_in_progress_is_held_by_one_job(store: ArtifactStore) -> None:
    from genpi.store.lease import LeaseHeld, Leases

    first, second = Leases(store), Leases(store)
    first.take("prompts/p/h/train/r", "training of p")
    with pytest.raises(LeaseHeld) as caught:
        second.take("prompts/p/h/train/r", "training of p")
    message = str(caught.value)
    assert first.owner in message and "training of p" in message and "\n" not in message
    assert store.list_keys("prompts/p/h/train/r") == []  # beside the stage's folder, never in it
    first.close()
    second.take("prompts/p/h/train/r", "training of p")  # released: the next job gets it
    second.close()
    assert not store.exists("prompts/p/h/train/r.lease")


def test_an_abandoned_lease_expires(store: ArtifactStore) -> None:
    from genpi.store.lease import Leases

    dead = Leases(store, ttl_s=0.5)
    dead.take("prompts/p/h/synth/s", "synthesis of p")
    dead._stop.set()  # its job died: nobody renews it
    import time

    time.sleep(0.7)
    alive = Leases(store)
    alive.take("prompts/p/h/synth/s", "synthesis of p")
    assert store.get_json("prompts/p/h/synth/s.lease")["owner"] == alive.owner
    alive.close()


def test_a_lease_of_a_killed_job_on_this_machine_is_taken_over_at_once(store: ArtifactStore) -> None:
    import subprocess
    import sys

    from genpi.store.lease import LeaseHeld, Leases

    killed = Leases(store)
    killed.take("prompts/p/h/train/r", "training of p")
    killed._stop.set()
    lease = store.get_json("prompts/p/h/train/r.lease")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    store.put_json("prompts/p/h/train/r.lease", {**lease, "pid": int(gone.stdout)})  # a driver SIGKILLed
    rerun = Leases(store)
    rerun.take("prompts/p/h/train/r", "training of p")  # not 5 minutes later
    assert store.get_json("prompts/p/h/train/r.lease")["owner"] == rerun.owner
    # a live holder (this process), or one on another machine, keeps its lease until it expires
    elsewhere = Leases(store)
    with pytest.raises(LeaseHeld):
        elsewhere.take("prompts/p/h/train/r", "training of p")
    store.put_json("prompts/p/h/train/r.lease", {**lease, "pid": int(gone.stdout), "space": "other-host pid:[1]"})
    with pytest.raises(LeaseHeld):
        elsewhere.take("prompts/p/h/train/r", "training of p")
    rerun.close()


def test_replacing_a_model_folders_weights_changes_the_keys(tmp_path: Path) -> None:
    import shutil

    from genpi import artifacts
    from genpi.config import load_config
    from genpi.models import model_fingerprint, resolve_model
    from genpi.prompt.spec import PromptSpec, Turn

    folder = tmp_path / "my-model"
    shutil.copytree(resolve_model("tiny-random-llama"), folder)
    cfg = load_config(
        "local",
        overrides={
            "models.generator.name": str(folder),
            "models.target.name": str(folder),
            "models.generator.backend": "hf",
            "models.target.backend": "hf",
        },
    )
    spec = PromptSpec(name="p", source="p.md", turns=(Turn("system", "Be brief."),))
    before = (
        artifacts.synth_prefix(spec, cfg),
        artifacts.train_prefix(spec, cfg),
        artifacts.eval_prefix(spec, cfg, []),
    )
    weights = bytearray((folder / "model.safetensors").read_bytes())
    weights[-100] ^= 0xFF  # same shapes, same header: other weights
    (folder / "model.safetensors").write_bytes(bytes(weights))
    model_fingerprint.cache_clear()  # a new run (fingerprints are cached per process)
    after = (artifacts.synth_prefix(spec, cfg), artifacts.train_prefix(spec, cfg), artifacts.eval_prefix(spec, cfg, []))
    assert all(a != b for a, b in zip(before, after))


def test_genpi_verify_names_what_differs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from genpi.cli.main import main

    store = open_store(str(tmp_path / "store"))
    prefix = "prompts/shell/aaaa/synth/s1"
    store.put_jsonl(f"{prefix}/records.jsonl", [{"id": 1}, {"id": 2}])
    store.mark_done(prefix)
    _adapter(store, "prompts/shell/aaaa/train/r1/adapter", 1)
    entry = registry.publish(store, "prompts/shell/aaaa/train/r1/adapter", _entry())
    store.put_json("batches/b1/manifest.json", {"prompts": [{"name": "shell", "prompt_hash": "aaaa"}]})
    flags = ["--store.url", str(tmp_path / "store")]
    assert main(["verify", *flags]) == 0 and "every file matches" in capsys.readouterr().out
    store.put_jsonl(f"{prefix}/records.jsonl", [{"id": 1}])
    store.put_bytes(f"{entry.prefix}/adapter_model.safetensors", b"altered")
    assert main(["verify", "b1", *flags]) == 1
    out = capsys.readouterr().out.splitlines()
    assert any(f"{prefix}/records.jsonl does not match" in line for line in out)
    assert any("adapter_model.safetensors differs" in line for line in out)
    assert out[-1].endswith("2 problems")
    assert store.exists(f"{prefix}/_SUCCESS")  # verify only reads
    assert main(["verify", "nope", *flags]) == 2 and "b1" in capsys.readouterr().err
