"""An artifact store in a local (or network-mounted) folder."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from genpi.errors import ArtifactNotFound, StoreError
from genpi.store.base import TEMP_SUFFIX, ArtifactStore, check_key, check_prefix

_COPY_CHUNK = 1 << 20


def atomic_write(path: Path, fill: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` via a temp file in the same folder, fsync and os.replace.

    A reader sees the old file or the whole new one; on any failure the temp file is
    removed and the old file is left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # os.open with 0o666 (not mkstemp's 0o600) so the final file gets the usual umask mode
    tmp = path.parent / f".{path.name[:100]}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    # makes the rename itself durable; not every filesystem allows it, which is fine
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class LocalStore(ArtifactStore):
    """Artifacts as files below a root folder, which is created on the first write."""

    def __init__(self, root: str | Path) -> None:
        super().__init__()
        self.root = Path(os.path.abspath(os.path.expanduser(root)))
        self.url = str(self.root)
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"store path {self.url} is a file, not a folder: remove it or choose another store path")

    def location(self, key: str) -> str:
        return str(self.root / key)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key, self.url)

    def _write(self, key: str, fill: Callable[[BinaryIO], object]) -> None:
        path = self._path(key)
        try:
            atomic_write(path, fill)
        except OSError as e:
            raise StoreError(
                f"cannot write {path} in store {self.url}: {e.strerror or e}; make sure the "
                "folder is writable (and no file sits where a folder is needed) or choose "
                "another store path"
            ) from e

    def _open(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            return open(path, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ArtifactNotFound(f"artifact {key!r} not found at {path}") from None
        except OSError as e:
            raise StoreError(f"cannot read {path} in store {self.url}: {e.strerror or e}; check its permissions") from e

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write(key, lambda f: f.write(data))

    def create_bytes(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        tmp = path.parent / f".{path.name[:100]}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}"
        try:
            atomic_write(tmp, lambda f: f.write(data))
            try:
                os.link(tmp, path)  # fails if path exists: a create-only rename of a whole file
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        except OSError as e:
            raise StoreError(
                f"cannot write {path} in store {self.url}: {e.strerror or e}; make sure the folder "
                "is writable and its filesystem supports hard links"
            ) from e
        _fsync_dir(path.parent)
        return True

    def get_bytes(self, key: str) -> bytes:
        with self._open(key) as f:
            return f.read()

    def put_file(self, key: str, path: str | Path) -> None:
        try:
            source = open(path, "rb")
        except OSError as e:
            raise StoreError(f"cannot read local file {path} to store it in {self.url}: {e.strerror or e}") from e
        with source:
            self._write(key, lambda f: shutil.copyfileobj(source, f, _COPY_CHUNK))

    def get_file(self, key: str, path: str | Path) -> Path:
        dest = Path(path)
        with self._open(key) as source:
            try:
                atomic_write(dest, lambda f: shutil.copyfileobj(source, f, _COPY_CHUNK))
            except OSError as e:
                raise self._local_write_failed(dest, key, e) from e
        return dest

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list_keys(self, prefix: str = "") -> list[str]:
        prefix = check_prefix(prefix, self.url)
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return []

        def fail(e: OSError) -> None:
            raise StoreError(
                f"cannot list {e.filename} in store {self.url}: {e.strerror or e}; check its permissions"
            ) from e

        keys = []
        for folder, _dirs, files in os.walk(base, onerror=fail):
            rel = Path(folder).relative_to(self.root).as_posix()
            keys.extend(name if rel == "." else f"{rel}/{name}" for name in files if not name.endswith(TEMP_SUFFIX))
        return sorted(keys)

    def delete_key(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            raise StoreError(
                f"cannot delete {path} in store {self.url}: {e.strerror or e}; check its permissions"
            ) from e

    def delete_prefix(self, prefix: str) -> None:
        target = self.root / check_prefix(prefix, self.url, allow_root=False)
        if not target.is_dir():
            return
        try:
            shutil.rmtree(target)
        except OSError as e:
            raise StoreError(
                f"cannot delete {target} in store {self.url}: {e.strerror or e}; check its permissions"
            ) from e
