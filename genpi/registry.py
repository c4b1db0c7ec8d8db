"""The registry of published adapters: the one boundary between the job (writer) and the server (reader).

A published adapter lives at ``adapters/<prompt>/<version>/``: the PEFT files and
``manifest.json`` (a :class:`PublishedAdapter`). Versions are immutable: a version that exists
is never written again, so a reader that cached one can never be stale. ``model="<prompt>"``
means that prompt's newest published version, ``"<prompt>@<version>"`` pins one; that rule is
decided here (:func:`resolve`) and nowhere else.

The registry also keeps the text of every prompt the job has taken up, at
``adapters/<prompt>/_prompts/<prompt_hash>.json`` (no version starts with ``_``), so that a server
can answer a prompt in prompt mode before, or without, a passing adapter. A prompt's hash names its
text, so these are immutable too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import tempfile
import typing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from genpi.errors import GenPIError, StoreError, short_repr
from genpi.prompt.spec import PromptSpec
from genpi.store import ArtifactStore
from genpi.store.base import file_digest

ROOT = "adapters"
MANIFEST = "manifest.json"
PROMPTS = "_prompts"
PIN = "@"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")  # a prompt's name or a version: one path segment


def version_prefix(prompt: str, version: str) -> str:
    """Where a published version's files live in the store."""
    return f"{ROOT}/{prompt}/{version}"


class RegistryError(GenPIError):
    """A model name that names no published adapter (the message lists what is published)."""


class PublishConflict(GenPIError):
    """Another job published (or is publishing) other files under the same version."""


@dataclass(frozen=True)
class PublishedAdapter:
    """What ``manifest.json`` says of one published adapter version."""

    prompt: str
    version: str
    prompt_hash: str
    run_hash: str
    base_model: str
    published_at: str
    source: str = ""  # the training run's adapter folder it was copied from
    report: str = ""  # the evaluation report that passed the gate
    gate: dict[str, Any] = field(default_factory=dict)
    retention: dict[str, float | None] = field(default_factory=dict)
    gap_closed: dict[str, float | None] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # file name -> {"sha256", "size"}
    probes: list[dict[str, Any]] = field(default_factory=list)  # parity probes: {"messages", "reply"}

    @property
    def name(self) -> str:
        """``<prompt>@<version>``: what a client sends to pin this version."""
        return f"{self.prompt}{PIN}{self.version}"

    @property
    def prefix(self) -> str:
        """Where its files live in the store."""
        return version_prefix(self.prompt, self.version)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PublishedAdapter:
        """Read a manifest; keys this version does not know are ignored (older manifests lack some).
        A manifest of another shape (a field missing or of another type) raises TypeError."""
        if not isinstance(data, dict):
            raise TypeError(f"a {type(data).__name__}, not an object")
        if "version" not in data and "/" in str(data.get("name", "")):  # manifests before the registry
            data = {**data, "version": data["name"].split("/", 1)[1]}
        kinds = typing.get_type_hints(cls)
        fields = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                kind = typing.get_origin(kinds[f.name]) or kinds[f.name]
                if not isinstance(data[f.name], kind):
                    raise TypeError(f"{f.name!r} is a {type(data[f.name]).__name__}, not a {kind.__name__}")
                fields[f.name] = data[f.name]
        return cls(**fields)


def _digests(folder: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        out[path.relative_to(folder).as_posix()] = {"sha256": h.hexdigest(), "size": path.stat().st_size}
    return out


def publish(store: ArtifactStore, source: str, entry: PublishedAdapter) -> PublishedAdapter:
    """Copy the adapter folder at ``source`` to ``entry``'s immutable version and write its manifest.

    Every file and the manifest are written create-only: a version that exists is never
    overwritten. The same adapter published twice (or by two jobs at once) is one version; other
    files under a version that exists raise :class:`PublishConflict` naming it. ``entry.files``
    and ``entry.published_at`` are filled in here.
    """
    manifest = f"{entry.prefix}/{MANIFEST}"
    with tempfile.TemporaryDirectory(prefix="genpi-publish-") as tmp:
        folder = store.download_dir(source, Path(tmp) / "adapter")
        files = _digests(folder)
        if store.exists(manifest):
            return _same_or_conflict(store, entry, files)
        entry = dataclasses.replace(
            entry,
            source=store.location(source),
            files=files,
            published_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        for name, digest in files.items():
            key = f"{entry.prefix}/{name}"
            if (
                not store.create_bytes(key, (folder / name).read_bytes())
                and file_digest(store.get_bytes(key)) != digest
            ):
                raise PublishConflict(
                    f"{store.location(key)} holds another file than {store.location(source)}: another job is "
                    f"publishing {entry.name} from another adapter; if it has no {MANIFEST} once that job "
                    f"ended, delete {store.location(entry.prefix)} and rerun"
                )
    # last: the manifest is what makes the version exist, and only one writer creates it
    if store.create_json(manifest, entry.to_json()):
        return entry
    return _same_or_conflict(store, entry, files)


def read_manifest(store: ArtifactStore, key: str) -> PublishedAdapter:
    """The manifest at ``key``, or a StoreError naming it when it is not one."""
    data = store.get_json(key)
    with store.reading(key, "an adapter manifest", "delete that version's folder and publish it again"):
        return PublishedAdapter.from_json(data)


def _same_or_conflict(store: ArtifactStore, entry: PublishedAdapter, files: dict[str, Any]) -> PublishedAdapter:
    """The version already published, when it is these files; else a PublishConflict naming it."""
    existing = read_manifest(store, f"{entry.prefix}/{MANIFEST}")
    if existing.files != files:
        raise PublishConflict(
            f"{existing.name} is already published from other files "
            f"({existing.source or 'another run'}, {existing.published_at}); versions are "
            f"immutable: publish under another version"
        )
    return existing


def download(store: ArtifactStore, entry: PublishedAdapter, folder: str | Path) -> Path:
    """The version's adapter files in ``folder``, checked against the manifest's digests (a
    RegistryError names the first file that differs: the published version was altered)."""
    local = store.download_dir(entry.prefix, folder)
    got = {k: v for k, v in _digests(local).items() if k != MANIFEST}
    for name, want in entry.files.items():
        if got.get(name, {}).get("sha256") != want.get("sha256"):
            raise RegistryError(
                f"{entry.name}: file {name} differs from the digest its manifest records "
                f"(the published version was altered); it is not served"
            )
    return local


def published(
    store: ArtifactStore,
    prompt: str | None = None,
    read: dict[str, PublishedAdapter] | None = None,
    unreadable: list[str] | None = None,
) -> list[PublishedAdapter]:
    """Every published adapter (of ``prompt`` when given), newest first.

    ``read`` keeps the manifests read, by key, across calls: a version is immutable, so a reader
    that lists the registry again reads only the manifests published since. A manifest that is not
    one raises a StoreError naming it, or, when ``unreadable`` is given, is left out and its error
    line appended there."""
    root = f"{ROOT}/{prompt}" if prompt else ROOT
    keys = [k for k in store.list_keys(root) if k.endswith(f"/{MANIFEST}") and k.count("/") == 3]
    read = {} if read is None else read
    for key in keys:
        if key not in read:
            try:
                read[key] = read_manifest(store, key)
            except StoreError as e:
                if unreadable is None:
                    raise
                unreadable.append(str(e))
    return sorted((read[k] for k in keys if k in read), key=lambda e: (e.published_at, e.version), reverse=True)


def record_prompt(store: ArtifactStore, spec: PromptSpec) -> None:
    """Keep ``spec``'s text in the registry (once: its hash names it), for a server's prompt mode."""
    store.create_json(f"{ROOT}/{spec.name}/{PROMPTS}/{spec.prompt_hash}.json", spec.to_json())  # create-only


def prompt_texts(
    store: ArtifactStore, read: dict[str, PromptSpec] | None = None, unreadable: list[str] | None = None
) -> dict[str, dict[str, PromptSpec]]:
    """The text of every prompt the job has taken up: name -> prompt hash -> spec.

    One listing of the registry (not of the job's artifacts); ``read`` keeps the texts read, by key,
    across calls, so a reader that asks again reads only the prompts recorded since. A text that is
    not one raises a StoreError naming it, or, when ``unreadable`` is given, is left out and its
    error line appended there."""
    read = {} if read is None else read
    texts: dict[str, dict[str, PromptSpec]] = {}
    for key in store.list_keys(ROOT):
        parts = key.split("/")
        if len(parts) != 4 or parts[2] != PROMPTS or not parts[3].endswith(".json"):
            continue
        if key not in read:
            try:
                data = store.get_json(key)
                with store.reading(key, "a prompt's text", "delete it and run the job on the prompt again"):
                    spec = PromptSpec.from_json(data)
                    if (spec.name, f"{spec.prompt_hash}.json") != (parts[1], parts[3]):
                        raise ValueError(f"it holds {spec.name}@{spec.prompt_hash}")
                    if dataclasses.replace(spec, prompt_hash="").prompt_hash != spec.prompt_hash:
                        raise ValueError("its text does not have the hash it is stored under")
                    read[key] = spec
            except StoreError as e:
                if unreadable is None:
                    raise
                unreadable.append(str(e))
                continue
        texts.setdefault(read[key].name, {})[read[key].prompt_hash] = read[key]
    return texts


def split_model(model: str) -> tuple[str, str | None]:
    """``"shell-agent@ab12"`` → ``("shell-agent", "ab12")``; ``"shell-agent"`` → ``("shell-agent", None)``."""
    prompt, _, version = model.partition(PIN)
    return prompt, version or None


def resolve(store: ArtifactStore, model: str) -> PublishedAdapter:
    """The adapter a request's ``model`` names: the prompt's newest version, or the pinned one."""
    prompt, version = split_model(model)
    if not all(_NAME.fullmatch(part) for part in (prompt, version or "x")):
        raise RegistryError(f"{short_repr(model)} names no published adapter: names are <prompt> or <prompt>@<version>")
    if version is not None:
        key = f"{version_prefix(prompt, version)}/{MANIFEST}"
        if store.exists(key):
            return read_manifest(store, key)
        versions = [e.version for e in published(store, prompt)]
        raise RegistryError(
            f"{short_repr(prompt)} has no published version {short_repr(version)}"
            + (f"; published: {', '.join(versions)}" if versions else "; nothing of it is published")
        )
    entries = published(store, prompt) if prompt else []
    if not entries:
        names = sorted({e.prompt for e in published(store)})
        raise RegistryError(
            f"no published adapter for {short_repr(prompt)}"
            + (f"; published prompts: {', '.join(names)}" if names else "; nothing is published yet")
        )
    return entries[0]


def problems(store: ArtifactStore, entry: PublishedAdapter) -> list[str]:
    """What differs between a published version and its manifest ([] when every file matches)."""
    if not entry.files:
        return [f"{store.location(entry.prefix)}/{MANIFEST} records no file digests: it vouches for nothing"]
    out = []
    for name, want in sorted(entry.files.items()):
        key = f"{entry.prefix}/{name}"
        if not store.exists(key):
            out.append(f"{store.location(key)} is missing")
        elif file_digest(store.get_bytes(key)) != want:
            out.append(f"{store.location(key)} differs from the digest {entry.name}'s manifest records")
    return out
