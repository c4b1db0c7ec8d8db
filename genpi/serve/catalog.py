"""What a request's ``model`` means now: a published adapter version, or a prompt served in prompt mode.

The registry decides which version a name means (:func:`genpi.registry.resolve`); the catalog
adds the server's side: versions this server refused (altered files, failed parity check) are
skipped, a prompt with no servable adapter falls back to prompt mode when the server knows its
text (``genpi serve --prompts DIR``, or the text the job kept in the registry), and its view of the
registry is at most ``serve.refresh_s`` old, so an adapter published while serving is used
within that time. Versions are immutable, so nothing cached about one can go stale.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime

from genpi import registry
from genpi.errors import short_repr
from genpi.prompt.spec import PromptSpec
from genpi.registry import PublishedAdapter, RegistryError
from genpi.serve.protocol import APIError, ModelCard
from genpi.store import ArtifactStore

log = logging.getLogger(__name__)

NO_PROBES = "unchecked (no probes recorded)"


@dataclass(frozen=True)
class Target:
    """What answers a request: ``adapter`` (a published version) or ``prompt`` (the base model reading it)."""

    prompt: str
    mode: str
    adapter: PublishedAdapter | None = None
    spec: PromptSpec | None = None

    @property
    def key(self) -> str:
        """The id a replica holds it under (multiplexed model id): immutable, so routing caches stay right."""
        if self.adapter is not None:
            return self.adapter.name
        assert self.spec is not None
        return f"prompt:{self.prompt}@{self.spec.prompt_hash[:16]}"


class Catalog:
    """The servable models: published adapters (through the registry) and known prompts."""

    def __init__(self, store: ArtifactStore, specs: list[PromptSpec], base_model: str, refresh_s: float) -> None:
        self.store, self.base_model, self.refresh_s = store, base_model, refresh_s
        self.given = {s.name: s for s in specs}  # genpi serve --prompts: these texts win over the store's
        self.seen: dict[str, dict[str, PromptSpec]] = {}  # name -> prompt_hash -> spec the job stored
        self.rejected: dict[str, str] = {}  # name@version -> why this server does not serve it
        self.parity: dict[str, str] = {}  # name@version -> its check's outcome, once a replica loaded it
        self._published: list[PublishedAdapter] = []
        self._manifests: dict[str, PublishedAdapter] = {}
        self._texts: dict[str, PromptSpec] = {}
        self._unreadable: set[str] = set()
        self._published_at = self._seen_at = -float("inf")

    def published(self) -> list[PublishedAdapter]:
        if time.monotonic() - self._published_at >= self.refresh_s:
            self._published = registry.published(self.store, read=self._manifests)
            self._published_at = time.monotonic()
            for a in self._published:
                if a.base_model != self.base_model and a.name not in self.rejected:
                    self.reject(a.name, f"trained on {a.base_model}; this server serves {self.base_model}")
        return self._published

    def _refresh_seen(self) -> None:
        if time.monotonic() - self._seen_at < self.refresh_s:
            return
        unreadable: list[str] = []
        self.seen = registry.prompt_texts(self.store, read=self._texts, unreadable=unreadable)
        self._seen_at = time.monotonic()
        for line in set(unreadable) - self._unreadable:  # once each, not at every refresh
            log.error("%s", line)
        self._unreadable.update(unreadable)

    def spec(self, name: str, prompt_hash: str | None = None) -> PromptSpec | None:
        """The prompt's text: the one given to the server, else the one the job stored (of ``prompt_hash``)."""
        if name in self.given and (prompt_hash is None or self.given[name].prompt_hash == prompt_hash):
            return self.given[name]
        if name not in self.seen or (prompt_hash and prompt_hash not in self.seen[name]):
            self._refresh_seen()
        versions = self.seen.get(name, {})
        if prompt_hash is not None:
            return versions.get(prompt_hash)
        newest = next((a.prompt_hash for a in self.published() if a.prompt == name and a.prompt_hash in versions), None)
        return versions.get(newest) if newest else next(iter(versions.values()), None)

    def _candidates(self, name: str) -> list[PublishedAdapter]:
        """The prompt's published versions, newest first; with a prompt given to the server, only
        the versions internalized from that very text (an edited prompt falls back until its own
        adapter is published)."""
        given = self.given.get(name)
        return [
            a for a in self.published() if a.prompt == name and (given is None or a.prompt_hash == given.prompt_hash)
        ]

    def resolve(self, model: str) -> Target:
        """The target of ``model``; an APIError (404 unknown, 503 every version refused) otherwise."""
        name, version = registry.split_model(model)
        if version is not None:
            try:
                entry = registry.resolve(self.store, model)
            except RegistryError as e:
                raise APIError(404, str(e), param="model", code="model_not_found") from None
            self.published()  # refuses versions of another base model
            if entry.name in self.rejected:
                raise APIError(
                    503,
                    f"{entry.name} is not served: {self.rejected[entry.name]}",
                    type="server_error",
                    param="model",
                    code="model_rejected",
                )
            return Target(name, "adapter", adapter=entry)
        candidates = self._candidates(name)
        entry = next((a for a in candidates if a.name not in self.rejected), None)
        if entry is not None:
            return Target(name, "adapter", adapter=entry)
        spec = self.spec(name)
        if spec is not None:
            return Target(name, "prompt", spec=spec)
        if candidates:
            why = "; ".join(f"{a.name}: {self.rejected[a.name]}" for a in candidates)
            raise APIError(
                503,
                f"no version of {name!r} is served: {why}",
                type="server_error",
                param="model",
                code="model_rejected",
            )
        known = sorted(self.names())
        raise APIError(
            404,
            f"unknown model {short_repr(model)}; served: {', '.join(known) if known else 'nothing yet'}",
            param="model",
            code="model_not_found",
        )

    def reject(self, name: str, reason: str) -> None:
        log.error("not serving %s: %s", name, reason)
        self.rejected[name] = reason

    def names(self) -> set[str]:
        self._refresh_seen()
        return {a.prompt for a in self.published()} | set(self.given) | set(self.seen)

    def cards(self) -> list[ModelCard]:
        """``GET /v1/models``: every servable prompt, what answers it now and why."""
        return [self._card(name) for name in sorted(self.names())]

    def card(self, model: str) -> ModelCard:
        """``GET /v1/models/{model}``: one prompt's card, or with ``name@version`` that version's;
        an unknown name or version gets the 404 (a refused version the 503) a request for it gets."""
        name, version = registry.split_model(model)
        if version is not None:
            return self._adapter_card(model, self.resolve(model).adapter, {})
        if name not in self.names():
            self.resolve(model)  # raises the 404 of an unknown name (a card would say "unavailable")
        return self._card(name)

    def _card(self, name: str) -> ModelCard:
        rejected = {
            a.name: self.rejected[a.name] for a in self.published() if a.prompt == name and a.name in self.rejected
        }
        try:
            target = self.resolve(name)
        except APIError:
            return ModelCard(id=name, created=0, base_model=self.base_model, mode="unavailable", rejected=rejected)
        if target.adapter is None:
            return ModelCard(id=name, created=0, base_model=self.base_model, mode="prompt", rejected=rejected)
        return self._adapter_card(name, target.adapter, rejected)

    def _adapter_card(self, model: str, a: PublishedAdapter, rejected: dict[str, str]) -> ModelCard:
        parity = self.parity.get(a.name) or (NO_PROBES if not a.probes else "not checked yet (first request loads it)")
        return ModelCard(
            id=model,
            created=_epoch(a.published_at),
            version=a.version,
            base_model=a.base_model,
            mode="adapter",
            retention=a.retention,
            gap_closed=a.gap_closed,
            parity=parity,
            rejected=rejected,
        )


def _epoch(stamp: str) -> int:
    try:
        return int(datetime.fromisoformat(stamp).timestamp())
    except ValueError:
        return 0
