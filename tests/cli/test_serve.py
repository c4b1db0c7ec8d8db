"""`genpi serve`'s start-up line: what a client can ask for now, or that nothing is served yet."""

from __future__ import annotations

from pathlib import Path

from genpi.cli.serve import served_now
from genpi.models import TINY
from genpi.serve.catalog import Catalog
from genpi.store import open_store
from tests.serve.support import prompt_spec, publish, random_adapter


def test_an_empty_store_says_nothing_is_served_yet(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "store"))
    line = served_now(Catalog(store, [], TINY, refresh_s=2.0))
    assert line.startswith("nothing to serve yet") and store.url in line and "(2 s)" in line


def test_models_by_what_answers_them(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "store"))
    publish(store, prompt_spec("shell-agent"), "v1", random_adapter(tmp_path / "shell", seed=1), probes=False)
    given = [prompt_spec("deploy-now")]
    line = served_now(Catalog(store, given, TINY, refresh_s=2.0))
    assert line == "models: shell-agent (its adapter); deploy-now (the prompt prepended)"
    # A server of another base model serves the stored prompt's text instead of the adapter.
    other = served_now(Catalog(store, given, "smollm2-135m-instruct", refresh_s=2.0))
    assert other == "models: deploy-now, shell-agent (the prompt prepended)"
