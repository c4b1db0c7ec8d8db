"""Real inputs (hand-written, not synthesized) for evaluation: ``--real-inputs DIR`` (or ``--eval-inputs``) holds ``<prompt name>.jsonl`` files.

Each line is a JSON object ``{"input": "..."}`` (UTF-8, a BOM is accepted). A file whose name matches no prompt, a line that
is not such an object, or an empty file is an error naming the file (and line) and the fix.
"""

from __future__ import annotations

from pathlib import Path

from genpi.config import parse_json, read_text_file
from genpi.errors import GenPIError, short_repr

MAX_INPUTS_BYTES = 16 << 20


class RealInputError(GenPIError):
    """A real-inputs folder or file cannot be used."""


def load_real_inputs(folder: str | Path, prompt_names: list[str]) -> dict[str, list[str]]:
    """Inputs per prompt name from ``folder``; prompts without a file get none."""
    root = Path(folder)
    if not root.is_dir():
        raise RealInputError(f"--real-inputs {folder} is not a folder; pass a folder of <prompt name>.jsonl files")
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    unknown = [p.name for p in files if p.suffix != ".jsonl" or p.stem not in prompt_names]
    if unknown:
        raise RealInputError(
            f"--real-inputs {folder}: {', '.join(unknown)} match(es) no prompt; name each file "
            f"<prompt name>.jsonl with one of: {', '.join(prompt_names)}"
        )
    out: dict[str, list[str]] = {}
    for path in files:
        inputs = []
        text = read_text_file(path, RealInputError, limit=MAX_INPUTS_BYTES)
        for number, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            row = parse_json(line, f"{path}:{number}", RealInputError, fix='write one {"input": "..."} object per line')
            if not isinstance(row, dict) or not isinstance(row.get("input"), str) or not row["input"].strip():
                raise RealInputError(
                    f'{path}:{number}: expected an object with a non-empty "input" string, '
                    f"got {short_repr(line.strip())}"
                )
            inputs.append(row["input"].strip())
        if not inputs:
            raise RealInputError(f'{path} has no inputs; add lines like {{"input": "..."}} or remove the file')
        out[path.stem] = inputs
    return out
