"""The registry of published adapters: the one boundary between the job (writer) and the server (reader).

A published adapter lives at ``adapters/<prompt>/<version>/``: the PEFT files and
``manifest.json`` (a :class:`PublishedAdapter`). Versions are immutable: a version that exists
is never written again, so a reader that cached one can never be stale. ``model="<prompt>"``
means that prompt's newest published version, ``"<prompt>@<version>"`` pins one; that rule is
decided here (:func:`resolve`) and nowhere else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from genpi.errors import GenPIError
from genpi.store import ArtifactStore

ROOT = "adapters"
MANIFEST = "manifest.json"
PIN = "@"


class RegistryError(GenPIError):
    """A model name that names no published adapter (the message lists what is published)."""


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
        return f"{ROOT}/{self.prompt}/{self.version}"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PublishedAdapter:
        """Read a manifest; keys this version does not know are ignored (older manifests lack some)."""
        known = {f.name for f in dataclasses.fields(cls)}
        if "version" not in data and "/" in str(data.get("name", "")):  # manifests before the registry
            data = {**data, "version": data["name"].split("/", 1)[1]}
        return cls(**{k: v for k, v in data.items() if k in known})


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

    A version that already exists is returned as it is, never overwritten: the same run published
    twice is one adapter. ``entry.files`` and ``entry.published_at`` are filled in here.
    """
    manifest = f"{entry.prefix}/{MANIFEST}"
    if store.exists(manifest):
        return PublishedAdapter.from_json(store.get_json(manifest))
    with tempfile.TemporaryDirectory(prefix="genpi-publish-") as tmp:
        folder = store.download_dir(source, Path(tmp) / "adapter")
        entry = dataclasses.replace(entry, source=store.location(source), files=_digests(folder),
                                    published_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        store.upload_dir(folder, entry.prefix)
    store.put_json(manifest, entry.to_json())  # last: the manifest is what makes the version exist
    return entry


def download(store: ArtifactStore, entry: PublishedAdapter, folder: str | Path) -> Path:
    """The version's adapter files in ``folder``, checked against the manifest's digests (a
    RegistryError names the first file that differs: the published version was altered)."""
    local = store.download_dir(entry.prefix, folder)
    got = {k: v for k, v in _digests(local).items() if k != MANIFEST}
    for name, want in entry.files.items():
        if got.get(name, {}).get("sha256") != want.get("sha256"):
            raise RegistryError(f"{entry.name}: file {name} differs from the digest its manifest records "
                                f"(the published version was altered); it is not served")
    return local


def published(store: ArtifactStore, prompt: str | None = None,
              read: dict[str, PublishedAdapter] | None = None) -> list[PublishedAdapter]:
    """Every published adapter (of ``prompt`` when given), newest first.

    ``read`` keeps the manifests read, by key, across calls: a version is immutable, so a reader
    that lists the registry again reads only the manifests published since."""
    root = f"{ROOT}/{prompt}" if prompt else ROOT
    keys = [k for k in store.list_keys(root) if k.endswith(f"/{MANIFEST}") and k.count("/") == 3]
    read = {} if read is None else read
    for key in keys:
        if key not in read:
            read[key] = PublishedAdapter.from_json(store.get_json(key))
    return sorted((read[k] for k in keys), key=lambda e: (e.published_at, e.version), reverse=True)


def split_model(model: str) -> tuple[str, str | None]:
    """``"shell-agent@ab12"`` → ``("shell-agent", "ab12")``; ``"shell-agent"`` → ``("shell-agent", None)``."""
    prompt, _, version = model.partition(PIN)
    return prompt, version or None


def resolve(store: ArtifactStore, model: str) -> PublishedAdapter:
    """The adapter a request's ``model`` names: the prompt's newest version, or the pinned one."""
    prompt, version = split_model(model)
    if version is not None:
        key = f"{ROOT}/{prompt}/{version}/{MANIFEST}"
        if store.exists(key):
            return PublishedAdapter.from_json(store.get_json(key))
        versions = [e.version for e in published(store, prompt)]
        raise RegistryError(f"{prompt!r} has no published version {version!r}"
                            + (f"; published: {', '.join(versions)}" if versions else "; nothing of it is published"))
    entries = published(store, prompt) if prompt else []
    if not entries:
        names = sorted({e.prompt for e in published(store)})
        raise RegistryError(f"no published adapter for {prompt!r}"
                            + (f"; published prompts: {', '.join(names)}" if names else "; nothing is published yet"))
    return entries[0]
