"""The artifact store interface: a few backend primitives plus helpers built on them."""

from __future__ import annotations

import abc
import contextlib
import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from genpi.errors import ArtifactNotFound, StoreError

log = logging.getLogger(__name__)

DONE_MARKER = "_SUCCESS"
# Local stores write through temp files with this suffix; keys may not use it, so a
# temp file left by a killed writer can never be mistaken for an artifact.
TEMP_SUFFIX = ".genpi-tmp"


def _key_problem(key: object) -> str | None:
    if not isinstance(key, str):
        return "keys must be strings"
    if not key:
        return "it is empty"
    if "\\" in key:
        return "it contains a backslash"
    if "\x00" in key:
        return "it contains a NUL character"
    if key.startswith("/"):
        return "it starts with '/'"
    for segment in key.split("/"):
        if not segment:
            return "it has an empty path segment"
        if segment in (".", ".."):
            return f"it has a {segment!r} segment"
        if segment.endswith(TEMP_SUFFIX):
            return f"names ending in {TEMP_SUFFIX!r} are reserved for temporary files"
    return None


def _invalid(what: str, value: object, problem: str, store_url: str) -> StoreError:
    return StoreError(
        f"invalid {what} {value!r} for store {store_url}: {problem}; "
        "use a '/'-separated relative path such as 'runs/abc/data.json'"
    )


def check_key(key: str, store_url: str) -> str:
    """Return ``key`` unchanged if it is a valid store key, else raise StoreError naming it.

    Keys are '/'-separated relative paths without empty, '.' or '..' segments, a leading
    '/', or backslashes. Both backends validate with this one function.
    """
    problem = _key_problem(key)
    if problem:
        raise _invalid("key", key, problem, store_url)
    return key


def check_prefix(prefix: str, store_url: str, *, allow_root: bool = True) -> str:
    """Validate a folder prefix and return it without a trailing '/'.

    ``""`` means the whole store (refused when ``allow_root`` is false); one trailing '/'
    is accepted, otherwise the rules of :func:`check_key` apply.
    """
    if prefix == "" and allow_root:
        return ""
    if prefix == "":
        raise _invalid("prefix", prefix, "it would select the whole store", store_url)
    trimmed = prefix[:-1] if isinstance(prefix, str) and prefix.endswith("/") else prefix
    problem = _key_problem(trimmed)
    if problem:
        raise _invalid("prefix", prefix, problem, store_url)
    return trimmed


def join_key(prefix: str, name: str) -> str:
    """``prefix/name``, or just ``name`` when the prefix is empty."""
    return f"{prefix}/{name}" if prefix else name


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def file_digest(data: bytes) -> dict[str, Any]:
    """``{"sha256": hex, "size": bytes}``: what markers and publish manifests record of a file."""
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


class ArtifactStore(abc.ABC):
    """A flat key -> bytes store with folder-like keys, local or on S3.

    Backends implement the primitives (bytes, files, listing, deletion); text, JSON,
    JSONL, folder transfer and done markers are built on them here.
    """

    url: str  # human-readable root: an absolute folder path or s3://bucket/prefix

    def __init__(self) -> None:
        self._verified: set[str] = set()  # markers whose files this object checked

    # -- backend primitives -------------------------------------------------------------

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Store ``data`` atomically: readers see the old object or the whole new one."""

    @abc.abstractmethod
    def create_bytes(self, key: str, data: bytes) -> bool:
        """Store ``data`` only if ``key`` holds nothing yet, atomically (of two writers one creates
        it, whole); returns whether this call created it."""

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Read a key; raises ArtifactNotFound naming its location when it is missing."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether ``key`` holds an object."""

    @abc.abstractmethod
    def list_keys(self, prefix: str = "") -> list[str]:
        """Every key below folder ``prefix`` (recursive), sorted, relative to the store root.

        ``"a/b"`` selects ``"a/b/..."`` only, never ``"a/bc"`` or the key ``"a/b"`` itself.
        """

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Delete every key below folder ``prefix``; a missing prefix is not an error."""

    @abc.abstractmethod
    def delete_key(self, key: str) -> None:
        """Delete one key; a missing key is not an error."""

    @abc.abstractmethod
    def put_file(self, key: str, path: str | Path) -> None:
        """Store a local file atomically, streaming it (for large files such as weights)."""

    @abc.abstractmethod
    def get_file(self, key: str, path: str | Path) -> Path:
        """Copy a key to local ``path`` (parents created, replaced atomically); returns it."""

    def location(self, key: str) -> str:
        """Where ``key`` lives, for messages."""
        return join_key(self.url.rstrip("/"), key)

    # -- derived helpers ----------------------------------------------------------------

    def put_text(self, key: str, text: str) -> None:
        """Store ``text`` as UTF-8."""
        self.put_bytes(key, text.encode("utf-8"))

    def get_text(self, key: str) -> str:
        """Read a UTF-8 text object."""
        data = self.get_bytes(key)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise StoreError(
                f"{self.location(key)} is not UTF-8 text ({e}): it was not written by genpi; "
                "delete it and rerun the stage that writes it"
            ) from e

    def put_json(self, key: str, obj: Any) -> None:
        """Store ``obj`` as pretty-printed UTF-8 JSON."""
        self.put_bytes(key, _json_bytes(obj))

    def create_json(self, key: str, obj: Any) -> bool:
        """Store ``obj`` as JSON only if ``key`` holds nothing yet (see :meth:`create_bytes`)."""
        return self.create_bytes(key, _json_bytes(obj))

    def get_json(self, key: str) -> Any:
        """Read a JSON object."""
        text = self.get_text(key)
        try:
            return json.loads(text)
        except ValueError as e:  # bad syntax, or a number too long to read
            raise StoreError(
                f"{self.location(key)} is not valid JSON ({e}): delete it and rerun the stage that writes it"
            ) from e

    @contextlib.contextmanager
    def reading(self, key: str, what: str, fix: str) -> Iterator[None]:
        """Reading the document at ``key`` inside this block: a key or type the reader expects that
        it lacks (a file edited by hand, or written by another version) becomes a StoreError naming
        the file, ``what`` it should be and ``fix``."""
        try:
            yield
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
            problem = f"no {e}" if isinstance(e, KeyError) else str(e)
            raise StoreError(f"{self.location(key)} is not {what} genpi can read ({problem}); {fix}") from None

    def put_jsonl(self, key: str, records: Iterable[dict]) -> None:
        """Store records as JSON Lines.

        Every record is serialized before anything is written, so a failing producer
        leaves the previous object untouched.
        """
        lines = [json.dumps(record, ensure_ascii=False) + "\n" for record in records]
        self.put_text(key, "".join(lines))

    def get_jsonl(self, key: str) -> list[dict]:
        """Read a JSON Lines object; blank lines are skipped."""
        records = []
        # split on "\n" only: str.splitlines would also split on U+2028 inside strings
        for number, line in enumerate(self.get_text(key).split("\n"), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError as e:
                raise StoreError(
                    f"{self.location(key)} line {number} is not valid JSON ({e}): delete it "
                    "and rerun the stage that writes it"
                ) from e
        return records

    def _local_write_failed(self, dest: Path, key: str, error: OSError) -> StoreError:
        return StoreError(
            f"cannot write local file {dest} (copying {key!r} from store {self.url}): {error.strerror or error}"
        )

    def upload_dir(self, local_dir: str | Path, prefix: str) -> None:
        """Store every file below ``local_dir`` under ``prefix``, keeping relative paths."""
        source = Path(local_dir)
        prefix = check_prefix(prefix, self.url)
        if not source.is_dir():
            raise StoreError(f"cannot upload {source} to store {self.url}: it is not a folder")
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            self.put_file(join_key(prefix, path.relative_to(source).as_posix()), path)

    def download_dir(self, prefix: str, local_dir: str | Path) -> Path:
        """Copy every key below ``prefix`` into ``local_dir`` (the inverse of upload_dir).

        Raises ArtifactNotFound when nothing is stored below ``prefix``.
        """
        prefix = check_prefix(prefix, self.url)
        keys = self.list_keys(prefix)
        if not keys:
            where = self.location(prefix) if prefix else self.url
            raise ArtifactNotFound(f"nothing is stored under {where}")
        dest = Path(local_dir)
        cut = len(prefix) + 1 if prefix else 0
        for key in keys:
            self.get_file(key, dest / check_key(key[cut:], self.url))
        return dest

    def digests(self, keys: Iterable[str], cut: int = 0) -> dict[str, dict[str, Any]]:
        """``{key[cut:]: {"sha256", "size"}}`` of stored objects, read back from the store."""
        return {key[cut:]: file_digest(self.get_bytes(key)) for key in keys}

    def mark_done(self, prefix: str, info: dict | None = None, vouch: Iterable[str] | None = None) -> None:
        """Write ``prefix/_SUCCESS``; call it last, after all of the stage's outputs.

        The marker records the sha256 and size of every file it vouches for: all below ``prefix``,
        or only those below (or equal to) the relative paths in ``vouch``.
        """
        prefix = check_prefix(prefix, self.url)
        marker = self._marker(prefix)
        names = tuple(vouch) if vouch is not None else None
        keys = [
            k
            for k in self.list_keys(prefix)
            if k != marker
            and (
                names is None or any(k == join_key(prefix, n) or k.startswith(join_key(prefix, n) + "/") for n in names)
            )
        ]
        record = {"finished_at": datetime.now(UTC).isoformat(timespec="seconds")}
        record.update(info or {})
        record["files"] = self.digests(keys, len(prefix) + 1)
        self.put_json(marker, record)
        self._verified.add(marker)

    def done_problems(self, prefix: str) -> list[str]:
        """What is wrong with the stage under ``prefix``: [] when its marker exists and every file it
        vouches for has the recorded size and sha256; else one line per problem, naming the key."""
        marker = self._marker(prefix)
        try:
            record = self.get_json(marker)
        except ArtifactNotFound:
            return [f"{self.location(marker)} is missing: the stage did not finish"]
        except StoreError as e:
            return [str(e)]
        files = record.get("files") if isinstance(record, dict) else None
        if not isinstance(files, dict):
            return [f"{self.location(marker)} records no digests (an older genpi wrote it): it vouches for nothing"]
        problems = []
        for name, expected in sorted(files.items()):
            key = join_key(check_prefix(prefix, self.url), name)
            try:
                actual = file_digest(self.get_bytes(key))
            except ArtifactNotFound:
                problems.append(f"{self.location(key)} is missing")
                continue
            if actual != expected:
                problems.append(
                    f"{self.location(key)} does not match its marker: {actual['size']} bytes, "
                    f"sha256 {actual['sha256'][:12]}; recorded {expected.get('size')} bytes, "
                    f"sha256 {str(expected.get('sha256'))[:12]}"
                )
        return problems

    def is_done(self, prefix: str) -> bool:
        """Whether the stage under ``prefix`` finished and its files are the ones its marker vouches for.

        A marker that vouches for files that changed is never trusted: it is dropped, with the files
        that fail it, so a rerun redoes exactly what is wrong (a warning names each key).
        Verified once per store object.
        """
        marker = self._marker(prefix)
        if marker in self._verified:
            return True
        if not self.exists(marker):
            return False
        problems = self.done_problems(prefix)
        if not problems:
            self._verified.add(marker)
            return True
        for problem in problems:
            log.warning("%s; redoing the stage", problem)
        self.forget(prefix)
        return False

    def forget(self, prefix: str) -> None:
        """Make the stage under ``prefix`` not done: drop its marker and the files that fail it."""
        marker = self._marker(prefix)
        try:
            files = self.get_json(marker).get("files") or {}
        except (StoreError, AttributeError):
            files = {}
        prefix = check_prefix(prefix, self.url)
        for name, expected in files.items():
            key = join_key(prefix, name)
            try:
                if file_digest(self.get_bytes(key)) != expected:
                    self.delete_key(key)
            except ArtifactNotFound:
                pass
        self.delete_key(marker)
        self._verified.discard(marker)

    def done_info(self, prefix: str) -> dict:
        """The done marker's record; raises ArtifactNotFound when the stage is not done."""
        return self.get_json(self._marker(prefix))

    def _marker(self, prefix: str) -> str:
        return join_key(check_prefix(prefix, self.url), DONE_MARKER)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"
