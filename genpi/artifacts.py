"""Where each artifact lives in the store: keys built from content hashes.

```
prompts/<name>/<prompt_hash>/prompt.json
prompts/<name>/<prompt_hash>/synth/<synth_hash>/...          (inputs, outputs, reasons, conversations,
                                                               records.jsonl, quality.json, split.json)
prompts/<name>/<prompt_hash>/train/<run_hash>/...             (adapter/, metrics.json, summary.json)
prompts/<name>/<prompt_hash>/eval/<eval_key>/...               (episodes/, scores/, report.json|md, *.png;
                                                               a run's validation figures: summary.json)
prompts/<name>/<prompt_hash>/selection/<key>/selection.json   (a sweep's runs side by side, the one chosen)
adapters/<name>/<prompt_hash8>-<run_hash8>/...                 (published adapter + manifest.json: genpi.registry)
batches/<batch_hash>/manifest.json, report.json, report.md
```
``synth_hash`` covers the synthesis config and both models; ``run_hash`` covers the data it
trained on (``synth_hash``) and the training config. Every stage folder is finished when its
``_SUCCESS`` marker exists, so a rerun with the same inputs finds it and redoes nothing.
"""

from __future__ import annotations

from genpi.config import GenPIConfig
from genpi.fingerprint import fingerprint
from genpi.prompt.spec import PromptSpec


def prompt_root(spec: PromptSpec) -> str:
    return f"prompts/{spec.name}/{spec.prompt_hash}"


def synth_prefix(spec: PromptSpec, cfg: GenPIConfig) -> str:
    return f"{prompt_root(spec)}/synth/{cfg.synth_hash()}"


def run_hash(cfg: GenPIConfig) -> str:
    return fingerprint({"synth": cfg.synth_hash(), "train": cfg.train_key()})


def train_prefix(spec: PromptSpec, cfg: GenPIConfig) -> str:
    return f"{prompt_root(spec)}/train/{run_hash(cfg)}"


def eval_prefix(spec: PromptSpec, cfg: GenPIConfig, real_inputs: list[str]) -> str:
    """An evaluation depends on the adapter's run, the eval config and split, and the real inputs."""
    # "user_inputs" was the real inputs' earlier name; the key keeps it so stored evaluations stay found.
    key = fingerprint({"run": run_hash(cfg), "eval": cfg.eval_hash(), "user_inputs": real_inputs})
    return f"{prompt_root(spec)}/eval/{key}"


def validation_prefix(spec: PromptSpec, cfg: GenPIConfig) -> str:
    """One run's figures on the validation split, which a sweep chooses its run by."""
    key = fingerprint({"run": run_hash(cfg), "eval": cfg.eval_hash(), "set": "val"})
    return f"{prompt_root(spec)}/eval/{key}"


def selection_prefix(spec: PromptSpec, runs: list[GenPIConfig]) -> str:
    """The choice among a sweep's runs of one prompt."""
    key = fingerprint({"runs": [run_hash(r) for r in runs], "eval": runs[0].eval_hash()})
    return f"{prompt_root(spec)}/selection/{key}"


def published_version(spec: PromptSpec, cfg: GenPIConfig) -> str:
    """The immutable version a passing adapter is published under (:mod:`genpi.registry`)."""
    return f"{spec.prompt_hash[:8]}-{run_hash(cfg)[:8]}"


def batch_prefix(specs: list[PromptSpec], cfg: GenPIConfig, real_inputs: dict[str, list[str]]) -> str:
    runs = [run_hash(r) for r in cfg.train_runs()]
    return "batches/" + fingerprint({"prompts": [s.prompt_hash for s in specs],
                                     "run": runs[0] if len(runs) == 1 else runs,
                                     "eval": cfg.eval_hash(), "user_inputs": real_inputs})
