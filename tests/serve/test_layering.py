"""The server reads what the job wrote only through the registry: ``genpi/serve`` imports no stage."""

from __future__ import annotations

import ast
from pathlib import Path

import genpi

ALLOWED = {"genpi.registry", "genpi.engines", "genpi.prompt", "genpi.chat", "genpi.config", "genpi.store",
           "genpi.errors", "genpi.models", "genpi.devices", "genpi.ray_runtime", "genpi.fingerprint",
           "genpi.parity", "genpi.serve"}


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | ({f"{node.module}.{a.name}" for a in node.names} if node.module == "genpi" else set())
    return {n for n in names if n.startswith("genpi.")}


def test_serve_imports_only_the_infrastructure_and_the_registry() -> None:
    for path in sorted((Path(genpi.__file__).parent / "serve").glob("*.py")):
        for name in imported(path):
            assert any(name == a or name.startswith(a + ".") for a in ALLOWED), f"{path.name} imports {name}"
