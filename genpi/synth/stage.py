"""The synthesis stage for one prompt, with a fixed lifecycle: inputs → outputs → reasons →
role-played conversations → joined records (action-format filter applied) and quality report.

Reasons are written for ``synth.reason_fraction`` of the inputs (all, as in the paper, by
default); the other records carry an empty reason and give no Prompt Generation example.

Every input gets the student's and the teacher's single-turn outputs, but only the records
training reads (train and validation) are explained and role-played: a test record is never
trained on, and evaluation plays its episodes itself (greedy, against the same environment). Test
records keep no turns (``end`` is ``"test"``). Stages derive the split from the record ids
(:mod:`genpi.prompt.splits`); since it decides what is role-played, the split config is part of
the synthesis key.

Each step stores its results under the prompt's synth key and marks itself done, so a rerun
skips finished steps and finished parts of an interrupted one.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from genpi import artifacts
from genpi.config import GenPIConfig
from genpi.errors import GenPIError
from genpi.fingerprint import fingerprint
from genpi.prompt.spec import PromptSpec
from genpi.prompt.splits import TEST, assign_splits
from genpi.prompt.views import NO_REASON
from genpi.store import ArtifactStore
from genpi.synth.format_filter import filter_record
from genpi.synth.inputs import InputStats, generate_inputs
from genpi.synth.outputs import single_turn_outputs
from genpi.synth.parts import run_in_parts
from genpi.synth.quality import quality_report
from genpi.synth.reasons import reasons
from genpi.synth.roleplay import max_turns_for, role_play

log = logging.getLogger(__name__)


def join_by_id(rows: list[dict], *others: list[dict]) -> list[dict]:
    """Each row of ``rows`` merged with the rows of ``others`` that carry its id (never by position)."""
    indexes = [{o["id"]: o for o in other} for other in others]
    for index in indexes:
        missing = [r["id"] for r in rows if r["id"] not in index]
        if missing:
            raise ValueError(f"stored synthesis rows lack ids {missing[:5]}; delete the step's parts to redo it")
    return [{**row, **{k: v for index in indexes for k, v in index[row["id"]].items()}} for row in rows]


def reason_ids(ids: list[int], fraction: float, seed: int) -> set[int]:
    """The ids that get a reason: ``round(n * fraction)`` of them (at least one when the fraction is
    above 0), picked by a hash of (seed, id) salted apart from the split's, so that they spread
    over train, validation and test alike."""
    order = sorted(ids, key=lambda i: fingerprint(["reason", seed, i]))
    count = len(order) if fraction >= 1 else max(1 if fraction > 0 else 0, round(len(order) * fraction))
    return set(order[:count])


def with_unexplained(rows: list[dict], reason_rows: list[dict]) -> list[dict]:
    """``reason_rows`` plus an empty reason (``reason_finish`` ``"none"``) for every other row."""
    have = {r["id"] for r in reason_rows}
    return reason_rows + [
        {"id": r["id"], "reason": "", "reason_finish": NO_REASON} for r in rows if r["id"] not in have
    ]


class TooFewInputs(GenPIError):
    """The generator could not produce enough usable, unique inputs."""


def synthesize(spec: PromptSpec, cfg: GenPIConfig, generator, target, store: ArtifactStore) -> str:
    """Produce (or find) the synthesized records of ``spec``; returns their store prefix."""
    prefix = artifacts.synth_prefix(spec, cfg)
    if store.is_done(prefix):
        log.info("[%s] synthesis found at %s", spec.name, store.location(prefix))
        return prefix
    s = cfg.synth

    if store.is_done(f"{prefix}/inputs"):
        inputs = store.get_jsonl(f"{prefix}/inputs/inputs.jsonl")
        stats = InputStats(**store.done_info(f"{prefix}/inputs")["stats"])
    else:
        embed = None
        if s.near_duplicate_threshold > 0:
            from genpi.embeddings import load_embedder

            embed = load_embedder().embed
        texts, stats = generate_inputs(spec, s, generator, store, f"{prefix}/inputs", embed)
        if len(texts) < s.min_inputs:
            raise TooFewInputs(
                f"{spec.source}: the generator wrote only {len(texts)} usable unique inputs in "
                f"{stats.rounds} rounds (need synth.min_inputs={s.min_inputs}); add example_inputs to the "
                f"prompt's settings, raise synth.max_input_rounds, or use a stronger generator model"
            )
        inputs = [{"id": i, "input": x} for i, x in enumerate(texts)]
        store.put_jsonl(f"{prefix}/inputs/inputs.jsonl", inputs)
        store.mark_done(f"{prefix}/inputs", {"stats": vars(stats)})
    log.info(
        "[%s] %d pseudo inputs (%d candidates; removed: %d duplicates, %d near duplicates)",
        spec.name,
        len(inputs),
        stats.candidates,
        stats.duplicates,
        stats.near_duplicates,
    )

    outputs = run_in_parts(
        store,
        f"{prefix}/outputs",
        inputs,
        s.part_size,
        lambda part: single_turn_outputs(spec, s, target, part),
        f"[{spec.name}] outputs",
    )
    joined = join_by_id(inputs, outputs)
    explained = reason_ids([r["id"] for r in inputs], s.reason_fraction, s.seed)
    split = assign_splits([r["id"] for r in inputs], cfg.split.val_fraction, cfg.split.test_fraction, cfg.split.seed)
    trained = [r for r in joined if split[r["id"]] != TEST]  # what training reads
    # Reasons (generator) and role play (target) need only the outputs: run them side by side.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="reasons") as side:
        reasons_done = side.submit(
            run_in_parts,
            store,
            f"{prefix}/reasons",
            [r for r in trained if r["id"] in explained],
            s.part_size,
            lambda part: reasons(spec, s, generator, part),
            f"[{spec.name}] reasons",
        )
        conversations = run_in_parts(
            store,
            f"{prefix}/conversations",
            trained,
            s.part_size,
            lambda part: role_play(spec, s, target, part),
            f"[{spec.name}] role play",
        )
        reason_rows = with_unexplained(joined, reasons_done.result())
    conversations = join_by_id(trained, conversations)  # in the inputs' order, as the records
    held_out = [{"id": r["id"], "turns": [], "end": TEST} for r in joined if split[r["id"]] == TEST]
    records = [
        filter_record(spec, row, s.filter_off_format)
        for row in join_by_id(joined, reason_rows, conversations + held_out)
    ]

    played = [r for r in records if split[r["id"]] != TEST]
    quality = quality_report(spec, played, conversations, stats, max_turns_for(spec, s))
    quality["test_records"] = len(held_out)  # single-turn outputs only: not in the figures above
    store.put_jsonl(f"{prefix}/records.jsonl", records)
    store.put_json(f"{prefix}/quality.json", quality)
    store.mark_done(prefix, {"records": len(records), "config": artifacts.synth_key(cfg)})
    log.info(
        "[%s] synthesis done: %d records, avg %.2f turns, %s",
        spec.name,
        len(records),
        quality["avg_turns"],
        store.location(prefix),
    )
    return prefix
