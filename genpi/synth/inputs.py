"""Pseudo user inputs: the generator reads the prompt and example inputs and writes new ones.

Each request shows the examples as the start of a numbered list that the generator continues
(:func:`genpi.synth.templates.input_request`); the item a token limit cut off is dropped,
unless it is the reply's only one.
Requests are sampled (T=1.0, top-p 0.9 in the paper), several inputs per request; each round's
raw candidates are stored, so a rerun reuses finished rounds. Candidates are cleaned and
deduplicated in round order until ``num_inputs`` are kept: exact duplicates (case and whitespace
folded), then near duplicates, whose sentence embedding is within ``near_duplicate_threshold``
cosine of an input already kept or of the prompt's examples (paraphrases teach nothing new).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from genpi.config import SynthConfig
from genpi.engines.base import SamplingParams
from genpi.prompt.spec import PromptSpec
from genpi.store import ArtifactStore
from genpi.synth import templates

_ITEM = re.compile(r"^\s*(?:\d{1,3}\s*[.):-]|[-*•])\s*(.+?)\s*$")
_NUMBERING = re.compile(r"^\s*(?:\d{1,3}\s*[.)]\s*)+")
_MIN_CHARS, _MAX_CHARS = 12, 1200


@dataclass
class InputStats:
    """What happened to the generator's candidates."""

    requests: int = 0
    candidates: int = 0
    rejected: int = 0
    duplicates: int = 0
    near_duplicates: int = 0
    cut_off: int = 0
    kept: int = 0
    rounds: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


def parse_candidates(text: str) -> list[str]:
    """Inputs from one generator reply: the items of its numbered or bulleted list. Other lines
    (commentary, code, an item's wrapped tail) are not requests."""
    matches = [_ITEM.match(line) for line in text.splitlines()]
    items = [m.group(1).strip().strip("\"“”'").strip() for m in matches if m]
    return [item for item in items if item]


def normalize(text: str) -> str:
    """The form two inputs are compared in for deduplication: no list numbering, case or spacing."""
    return " ".join(_NUMBERING.sub("", text).lower().split())


class NearDuplicates:
    """Texts within ``threshold`` cosine similarity of one seen before, by unit-length embeddings."""

    def __init__(self, threshold: float, embed: Callable[[list[str]], Any], references: list[str]) -> None:
        self.threshold, self.embed = threshold, embed
        self.seen = embed(references) if references else None

    def keep(self, texts: list[str]) -> list[bool]:
        """For each text in order: kept (and remembered) unless near one seen or kept before it."""
        if not texts:
            return []
        import torch

        vectors, kept = self.embed(texts), []
        for vector in vectors:
            near = self.seen is not None and bool((self.seen @ vector).max() >= self.threshold)
            if not near:
                self.seen = vector[None] if self.seen is None else torch.cat([self.seen, vector[None]])
            kept.append(not near)
        return kept


def _rejection(candidate: str, seen_demos: set[str]) -> str:
    if len(candidate) < _MIN_CHARS:
        return "too_short"
    if len(candidate) > _MAX_CHARS:
        return "too_long"
    if normalize(candidate) in seen_demos:
        return "copies_an_example"
    return ""


def generate_inputs(
    spec: PromptSpec,
    cfg: SynthConfig,
    generator,
    store: ArtifactStore,
    prefix: str,
    embed: Callable[[list[str]], Any] | None = None,
) -> tuple[list[str], InputStats]:
    """Up to ``cfg.num_inputs`` unique pseudo inputs for ``spec``, and how they were obtained.

    ``embed`` (texts → unit-length embeddings) enables the near-duplicate filter when
    ``cfg.near_duplicate_threshold`` is above 0."""
    stats = InputStats()
    kept: list[str] = []
    seen: set[str] = set()
    demos = list(spec.example_inputs)
    demo_keys = {normalize(d) for d in demos}
    near = (
        NearDuplicates(cfg.near_duplicate_threshold, embed, demos)
        if embed is not None and cfg.near_duplicate_threshold > 0
        else None
    )
    for round_no in range(cfg.max_input_rounds):
        if len(kept) >= cfg.num_inputs:
            break
        key = f"{prefix}/round-{round_no:03d}.jsonl"
        if store.exists(key):
            replies = store.get_jsonl(key)
        else:
            missing = cfg.num_inputs - len(kept)
            # Ask for more than needed: small generators repeat themselves and break the format.
            n_requests = max(1, -(-2 * missing // cfg.inputs_per_request))
            rng = random.Random(f"{cfg.seed}-{round_no}")
            shown = [rng.sample(demos, min(cfg.demos_per_request, len(demos))) for _ in range(n_requests)]
            conversations = [templates.input_request(spec, d, cfg.inputs_per_request) for d in shown]
            params = SamplingParams(
                max_new_tokens=cfg.input_max_tokens,
                temperature=cfg.input_temperature,
                top_p=cfg.input_top_p,
                seed=cfg.seed + round_no,
            )
            # the list the generator continued, from its first new item on
            replies = [
                {"reply": f"{templates.first_new_item(d)} {g.text}", "finish": g.finish_reason}
                for d, g in zip(shown, generator.generate(conversations, params))
            ]
            store.put_jsonl(key, replies)
        stats.rounds += 1
        stats.requests += len(replies)
        fresh: list[str] = []
        for reply in replies:
            candidates = parse_candidates(reply["reply"])
            # The last item ran into the token limit mid-request. A reply that is that one item is
            # kept: some applications' inputs (emails, documents) are longer than the limit.
            if reply.get("finish") == "length" and len(candidates) > 1:
                stats.cut_off += 1
                candidates = candidates[:-1]
            for candidate in candidates:
                stats.candidates += 1
                why = _rejection(candidate, demo_keys)
                if why:
                    stats.rejected += 1
                    stats.reasons[why] = stats.reasons.get(why, 0) + 1
                elif normalize(candidate) in seen:
                    stats.duplicates += 1
                else:
                    seen.add(normalize(candidate))
                    fresh.append(candidate)
        verdicts = near.keep(fresh) if near else [True] * len(fresh)
        stats.near_duplicates += verdicts.count(False)
        kept.extend([c for c, ok in zip(fresh, verdicts) if ok][: cfg.num_inputs - len(kept)])
    stats.kept = len(kept)
    return kept, stats
