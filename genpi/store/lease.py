"""Leases: a stage in progress is held by one job, so two jobs on one store never both write it.

A lease is the object ``<stage prefix>.lease`` beside the stage's folder (never inside it, where its
marker would vouch for it): who holds it and until when. It is created create-only, renewed while
the stage runs and deleted when it ends; one left by a job that died expires after ``TTL_S`` and
is then taken over, at once when that job ran on this machine and its process is gone (a killed
driver resubmitted). A job that finds a live lease gets :class:`LeaseHeld` naming the holder.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from datetime import UTC, datetime
from time import time

from genpi.errors import ArtifactNotFound, StoreError
from genpi.store.base import ArtifactStore, check_prefix

TTL_S = 300.0  # a lease not renewed for this long is abandoned (its job died)
log = logging.getLogger(__name__)


def _process_space() -> str:
    """This machine and process namespace: where a holder's pid can be checked (empty: nowhere)."""
    try:
        return f"{socket.gethostname()} {os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def _holder_is_gone(held: dict) -> bool:
    """Whether the job holding ``held`` ran in this process namespace and its process has ended."""
    pid = held.get("pid")
    if not isinstance(pid, int) or not held.get("space") or held["space"] != _process_space():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, someone else's
        return False
    return False  # alive (or its pid reused: then the lease waits for its expiry)


class LeaseHeld(StoreError):
    """Another job holds the lease of a stage in progress; the message names it."""


def lease_key(prefix: str, store: ArtifactStore) -> str:
    return check_prefix(prefix, store.url, allow_root=False) + ".lease"


class Leases:
    """The leases one job holds, renewed by one background thread until released or closed."""

    def __init__(self, store: ArtifactStore, ttl_s: float = TTL_S) -> None:
        self.store, self.ttl_s = store, ttl_s
        self.owner = f"{socket.gethostname()} pid {os.getpid()} ({uuid.uuid4().hex[:8]})"
        self._held: dict[str, str] = {}  # lease key -> what it guards
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def take(self, prefix: str, what: str) -> None:
        """Hold the stage under ``prefix``; raises LeaseHeld when another job holds it."""
        key = lease_key(prefix, self.store)
        for _ in range(2):
            if self.store.create_json(key, self._record(what)):
                return self._hold(key, what)
            try:
                held = self.store.get_json(key)
            except ArtifactNotFound:  # released meanwhile: try again
                continue
            expires = float(held.get("expires_at", 0)) if isinstance(held, dict) else 0.0
            if isinstance(held, dict) and held.get("owner") == self.owner:  # ours (a retried create)
                return self._hold(key, what)
            if expires > time() and not _holder_is_gone(held):
                until = datetime.fromtimestamp(expires, UTC).isoformat(timespec="seconds")
                raise LeaseHeld(
                    f"{what} is in progress in another job ({held.get('owner', '?')}; lease "
                    f"{self.store.location(key)} until {until}, renewed while it runs); rerun when it "
                    "has finished and its results are reused"
                )
            log.warning(
                "taking over %s: its job (%s) ended or stopped renewing it",
                self.store.location(key),
                held.get("owner", "?") if isinstance(held, dict) else "?",
            )
            self.store.delete_key(key)
        raise LeaseHeld(f"{what}: another job took {self.store.location(key)} at the same time; rerun later")

    def release(self, prefix: str) -> None:
        """Let go of the stage under ``prefix`` (when this job holds it)."""
        key = lease_key(prefix, self.store)
        with self._lock:
            if self._held.pop(key, None) is None:
                return
        if self._holder(key) == self.owner:
            self.store.delete_key(key)

    def close(self) -> None:
        """Release every lease and stop renewing."""
        self._stop.set()
        for key in list(self._held):
            self.release(key[: -len(".lease")])

    def __enter__(self) -> Leases:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _record(self, what: str) -> dict:
        return {
            "owner": self.owner,
            "what": what,
            "expires_at": time() + self.ttl_s,
            "space": _process_space(),
            "pid": os.getpid(),
        }

    def _holder(self, key: str) -> str | None:
        try:
            held = self.store.get_json(key)
        except StoreError:
            return None
        return held.get("owner") if isinstance(held, dict) else None

    def _hold(self, key: str, what: str) -> None:
        with self._lock:
            self._held[key] = what
        if self._renewer is None:
            self._renewer = threading.Thread(target=self._renew, name="genpi-leases", daemon=True)
            self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            with self._lock:
                held = dict(self._held)
            for key, what in held.items():
                try:
                    if self._holder(key) != self.owner:
                        log.error("lost %s to another job: %s may be written twice", self.store.location(key), what)
                        continue
                    self.store.put_json(key, self._record(what))
                except StoreError as e:  # the next round tries again; the lease is good for ttl_s
                    log.warning("could not renew %s: %s", self.store.location(key), e)
