"""The artifact store: every stage's inputs and outputs, in a local folder or on S3."""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from genpi.config import StoreConfig
from genpi.errors import StoreError
from genpi.store.base import ArtifactStore
from genpi.store.local import LocalStore

__all__ = ["ArtifactStore", "LocalStore", "S3Store", "open_store", "store_for"]

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def __getattr__(name: str) -> object:
    # boto3 is imported only where S3 is used: a local store starts without it
    if name == "S3Store":
        from genpi.store.s3 import S3Store

        return S3Store
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_store(
    url: str = "artifacts",
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    retry_s: float | None = None,
) -> ArtifactStore:
    """Open the store at ``url``.

    ``s3://bucket/prefix`` opens an :class:`S3Store` (``endpoint_url`` and ``region``
    override the AWS settings, ``retry_s`` the seconds a failing request is retried);
    ``file:///abs/path`` or a plain path opens a
    :class:`LocalStore`, relative paths resolved against the current directory
    (``endpoint_url``, ``region`` and ``retry_s`` are ignored there).
    """
    if not isinstance(url, str) or not url.strip():
        raise StoreError(f"empty store URL {url!r}: pass a folder path or s3://bucket/prefix")
    match = _SCHEME_RE.match(url)
    scheme = match.group(1).lower() if match else ""
    if scheme == "s3":
        from genpi.store.s3 import RETRY_S, S3Store

        return S3Store(url, endpoint_url=endpoint_url, region=region, retry_s=RETRY_S if retry_s is None else retry_s)
    if scheme == "file":
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise StoreError(
                f"store URL {url!r} names host {parsed.netloc!r}: file URLs must be local, like file:///abs/path"
            )
        return LocalStore(url2pathname(parsed.path))
    if scheme:
        raise StoreError(f"unsupported store URL {url!r}: use a folder path, file:///abs/path or s3://bucket/prefix")
    return LocalStore(url)


def store_for(cfg: StoreConfig, *, existing: bool = False, writable: bool = False) -> ArtifactStore:
    """The store a config's ``store`` section names. A local folder is checked at once: with
    ``existing`` (a command that only reads it) it must be there, not found empty (a typo in the
    path); with ``writable`` (a job) it is created and must take files, before any work starts."""
    store = open_store(cfg.url, endpoint_url=cfg.endpoint_url or None, region=cfg.region or None, retry_s=cfg.retry_s)
    if isinstance(store, LocalStore):
        if existing and not store.root.is_dir():
            raise StoreError(
                f"store folder {store.url} does not exist; check --store.url (a job creates it when it runs)"
            )
        if writable and (problem := _unwritable(store.root)):
            raise StoreError(f"store folder {store.url} cannot take files ({problem}); choose another --store.url")
    return store


def _unwritable(folder: Path) -> str | None:
    """Why ``folder`` (created if missing) cannot take files, or None."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return e.strerror or str(e)
    return None if os.access(folder, os.W_OK) else "it is not writable"
