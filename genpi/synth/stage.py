"""The synthesis stage for one prompt, with a fixed lifecycle: inputs → outputs → reasons →
role-played conversations → joined records (action-format filter applied) and quality report.

The train / validation / test split is not made here: stages derive it from the record ids
(:mod:`genpi.splits`), so the split config is not part of the synthesis key.

Each step stores its results under the prompt's synth key and marks itself done, so a rerun
skips finished steps and finished parts of an interrupted one.
"""

from __future__ import annotations

import logging

from genpi import layout
from genpi.config import GenPIConfig
from genpi.errors import GenPIError
from genpi.prompts import PromptSpec
from genpi.store import ArtifactStore
from genpi.synth.format_filter import filter_record
from genpi.synth.inputs import InputStats, generate_inputs
from genpi.synth.outputs import single_turn_outputs
from genpi.synth.parts import run_in_parts
from genpi.synth.quality import quality_report
from genpi.synth.reasons import reasons
from genpi.synth.roleplay import max_turns_for, role_play

log = logging.getLogger(__name__)


class TooFewInputs(GenPIError):
    """The generator could not produce enough usable, unique inputs."""


def synthesize(spec: PromptSpec, cfg: GenPIConfig, generator, target, store: ArtifactStore) -> str:
    """Produce (or find) the synthesized records of ``spec``; returns their store prefix."""
    prefix = layout.synth_prefix(spec, cfg)
    if store.is_done(prefix):
        log.info("[%s] synthesis found at %s", spec.name, store.location(prefix))
        return prefix
    store.put_json(f"{layout.prompt_root(spec)}/prompt.json", spec.to_json())
    s = cfg.synth

    if store.is_done(f"{prefix}/inputs"):
        inputs = store.get_jsonl(f"{prefix}/inputs/inputs.jsonl")
        stats = InputStats(**store.done_info(f"{prefix}/inputs")["stats"])
    else:
        texts, stats = generate_inputs(spec, s, generator, store, f"{prefix}/inputs")
        if len(texts) < s.min_inputs:
            raise TooFewInputs(
                f"{spec.source}: the generator wrote only {len(texts)} usable unique inputs in "
                f"{stats.rounds} rounds (need synth.min_inputs={s.min_inputs}); add example_inputs to the "
                f"prompt's settings, raise synth.max_input_rounds, or use a stronger generator model")
        inputs = [{"id": i, "input": x} for i, x in enumerate(texts)]
        store.put_jsonl(f"{prefix}/inputs/inputs.jsonl", inputs)
        store.mark_done(f"{prefix}/inputs", {"stats": vars(stats)})
    log.info("[%s] %d pseudo inputs (%d candidates, %d duplicates removed)",
             spec.name, len(inputs), stats.candidates, stats.duplicates)

    outputs = run_in_parts(store, f"{prefix}/outputs", inputs, s.part_size,
                           lambda part: single_turn_outputs(spec, s, target, part), f"[{spec.name}] outputs")
    joined = [{**i, **o} for i, o in zip(inputs, outputs)]
    reason_rows = run_in_parts(store, f"{prefix}/reasons", joined, s.part_size,
                               lambda part: reasons(spec, s, generator, part), f"[{spec.name}] reasons")
    conversations = run_in_parts(store, f"{prefix}/conversations", joined, s.part_size,
                                 lambda part: role_play(spec, s, target, part), f"[{spec.name}] role play")
    records = [filter_record(spec, {**j, **r, **c}, s.filter_off_format)
               for j, r, c in zip(joined, reason_rows, conversations)]

    quality = quality_report(spec, records, conversations, stats, max_turns_for(spec, s))
    store.put_jsonl(f"{prefix}/records.jsonl", records)
    store.put_json(f"{prefix}/quality.json", quality)
    store.mark_done(prefix, {"records": len(records), "config": cfg.synth_key()})
    log.info("[%s] synthesis done: %d records, avg %.2f turns, %s", spec.name, len(records),
             quality["avg_turns"], store.location(prefix))
    return prefix

