"""The house rules, read from the code's imports (every import, also those inside functions).

Layers, top to bottom: ``cli`` → ``batch`` / ``serve`` → the stages (``synth``, ``train``,
``evaluate``) → the domain pieces (``prompt``, ``engines``, ``store``, ``registry``,
``artifacts``, ``models``) → the infrastructure modules. A unit may import its own layer or
lower ones; stages never import each other, nor do ``batch`` and ``serve``; training never
imports an engine; the server reads only the registry, engines, prompt pieces and infrastructure.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "genpi"

LAYERS = {
    "cli": 4,
    "batch": 3,
    "serve": 3,
    "synth": 2,
    "train": 2,
    "evaluate": 2,
    "prompt": 1,
    "engines": 1,
    "store": 1,
    "registry": 1,
    "parity": 1,
    "artifacts": 1,
    "models": 1,
    "chat": 0,
    "config": 0,
    "devices": 0,
    "divergence": 0,
    "embeddings": 0,
    "errors": 0,
    "fingerprint": 0,
    "ray_runtime": 0,
    "reaper": 0,
    "telemetry": 0,
    "__init__": 0,
}
ISOLATED = ({"synth", "train", "evaluate"}, {"batch", "serve"})  # no unit of a set imports another of it
FORBIDDEN = {"train": {"engines"}}
# The server reads what the job wrote only through the registry: these and nothing else.
ONLY = {
    "serve": {
        "registry",
        "engines",
        "prompt",
        "chat",
        "config",
        "store",
        "errors",
        "models",
        "devices",
        "ray_runtime",
        "fingerprint",
        "parity",
    }
}


def unit_of(module: str) -> str | None:
    """``genpi.engines.hf`` → ``engines``; ``genpi`` itself → ``__init__``; other packages → None."""
    parts = module.split(".")
    if parts[0] != "genpi":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def imports() -> list[tuple[str, str, str]]:
    """(importing file, its unit, imported unit) for every genpi import in the package."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent)
        module = ".".join(rel.with_suffix("").parts)
        here = unit_of(module.removesuffix(".__init__")) if rel.parts[1:] != ("__init__.py",) else "__init__"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module] if node.module != "genpi" else [f"genpi.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                unit = unit_of(target)
                if unit is not None and unit != here:
                    found.append((str(rel), here, unit))
    return found


def test_every_unit_has_a_layer() -> None:
    units = {
        p.stem if p.is_file() else p.name
        for p in PACKAGE.iterdir()
        if (p.suffix == ".py" or (p / "__init__.py").is_file())
    }
    assert units <= set(LAYERS), f"give these a layer in {__file__}: {sorted(units - set(LAYERS))}"


@pytest.mark.parametrize("rule", ["no import runs upward", "stages never import each other", "forbidden imports"])
def test_layering(rule: str) -> None:
    broken = []
    for file, here, there in imports():
        if rule == "no import runs upward" and LAYERS[there] > LAYERS[here]:
            broken.append(f"{file}: {here} (layer {LAYERS[here]}) imports {there} (layer {LAYERS[there]})")
        if rule == "stages never import each other" and any(here in s and there in s for s in ISOLATED):
            broken.append(f"{file}: {here} imports {there}")
        if rule == "forbidden imports" and (there in FORBIDDEN.get(here, ()) or there not in ONLY.get(here, {there})):
            broken.append(f"{file}: {here} must not import {there}")
    assert not broken, "\n".join(broken)


def test_the_reader_sees_imports_inside_functions() -> None:
    """The import reader finds imports inside functions (where the lazy ones live)."""
    found = {(here, there) for _, here, there in imports()}
    assert ("cli", "batch") in found  # genpi/cli/run.py imports the batch inside execute()


def test_objectives_and_backends_are_registered_as_the_config_names_them() -> None:
    """Adding an objective or an engine backend is one module plus one line; these must agree."""
    import dataclasses
    import importlib

    from genpi.config import METHODS, ModelConfig
    from genpi.engines.backends import BACKENDS
    from genpi.train.objectives import OBJECTIVES

    assert set(OBJECTIVES) == set(METHODS) and all(cls.name == m for m, cls in OBJECTIVES.items())
    backend = next(f for f in dataclasses.fields(ModelConfig) if f.name == "backend")
    assert set(BACKENDS) == set(backend.metadata["choices"]) - {"auto"}
    assert all(callable(getattr(importlib.import_module(module), "build", None)) for module in BACKENDS.values())


def test_no_test_module_imports_another() -> None:
    tests = Path(__file__).resolve().parent
    broken = []
    for path in sorted(tests.rglob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tests."):
                if node.module.rsplit(".", 1)[-1].startswith("test_"):
                    broken.append(f"{path.relative_to(tests)} imports {node.module}")
    assert not broken, "share helpers through conftest.py fixtures or a plain module:\n" + "\n".join(broken)
