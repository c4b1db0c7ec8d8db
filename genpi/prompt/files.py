"""Prompt files: load and validate the fixed prompts of a folder into :class:`PromptSpec`.

A prompt folder holds one prompt per file (see ``prompts/README.md`` for the format):
Markdown/text with optional YAML front matter and ``<!-- turn: ROLE -->`` markers, or a
JSON/YAML list of turns / mapping with ``turns:`` and settings. Every problem with a file
raises :class:`~genpi.errors.PromptError` naming the file and the fix.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import Any

from genpi.config import parse_json, parse_yaml, read_text_file
from genpi.errors import PromptError, short_repr
from genpi.prompt import patterns
from genpi.prompt.spec import (
    DEFAULT_END_CONDITION,
    DEFAULT_END_TOKEN,
    DEFAULT_ENV_DESCRIPTION,
    DEFAULT_MAX_TURNS,
    MAX_TURNS_RANGE,
    ROLES,
    ActionFormat,
    EnvironmentSpec,
    PromptSpec,
    Turn,
)

TEXT_EXTENSIONS = (".txt", ".md", ".markdown")
DATA_EXTENSIONS = (".json", ".yaml", ".yml")
ALLOWED_EXTENSIONS = TEXT_EXTENSIONS + DATA_EXTENSIONS
SKIPPED_NAMES = ("readme.md", "readme.txt")  # compared case-insensitively
SETTINGS_KEYS = ("name", "max_turns", "environment", "example_inputs", "action_format")
ENVIRONMENT_KEYS = ("description", "end_condition", "end_token")
ACTION_FORMAT_KEYS = ("actions", "final")

_MARKER = re.compile(r"^[ \t]*<!--[ \t]*turn[ \t]*:[ \t]*([A-Za-z_-]*)[ \t]*-->[ \t]*$", re.I)


def load_prompt(path: str | Path) -> PromptSpec:
    """Load and validate one prompt file; raises PromptError naming the file."""
    p = Path(path)
    src = str(path)
    ext = p.suffix.lower()
    if not p.is_file():
        raise PromptError(f"{src}: not found or not a file; check the path")
    if ext not in ALLOWED_EXTENSIONS:
        raise PromptError(
            f"{src}: unknown extension {p.suffix or '(none)'!r}; prompt files must end in "
            f"{', '.join(ALLOWED_EXTENSIONS)} (rename it, or move it out of the prompt folder)"
        )
    text = read_text_file(p, PromptError)
    if not text.strip():
        raise PromptError(f"{src}: is empty; write the prompt text into it or remove the file")

    if ext in TEXT_EXTENSIONS:
        settings, turns = _parse_text(src, text)
    else:
        settings, turns = _parse_data(src, text, ext)
    _check_turn_order(src, turns)
    return _build_spec(src, p.stem, settings, turns)


def load_prompts(folder: str | Path) -> list[PromptSpec]:
    """Load every prompt file of a folder, in sorted name order.

    Dotfiles, README.md/README.txt and subfolders are skipped. Errors of all files are
    reported together; duplicate names are an error naming both files.
    """
    specs, problems = read_prompt_folder(folder)
    if problems:
        raise folder_error(problems)
    return specs


def folder_error(problems: dict[str, str]) -> PromptError:
    """One error for the files of a folder that did not load (each file's own message)."""
    errors = list(problems.values())
    return PromptError(
        errors[0] if len(errors) == 1 else f"{len(errors)} prompt files have problems:\n" + "\n".join(errors)
    )


def read_prompt_folder(folder: str | Path) -> tuple[list[PromptSpec], dict[str, str]]:
    """The prompts of a folder that load, and ``{file name: error}`` for those that do not (a
    batch runs the first and records the second). A missing or empty folder, or two files with one
    name, is still an error: nothing can be run, or which prompt is meant is unclear."""
    d = Path(folder)
    if not d.exists():
        raise PromptError(f"prompt folder {folder} does not exist; create it or pass the right path")
    if not d.is_dir():
        raise PromptError(f"{folder} is not a folder; pass the folder that holds the prompt files")
    files = sorted(
        f for f in d.iterdir() if f.is_file() and not f.name.startswith(".") and f.name.lower() not in SKIPPED_NAMES
    )
    if not files:
        raise PromptError(
            f"prompt folder {folder} has no prompt files; add one prompt per file ({', '.join(ALLOWED_EXTENSIONS)})"
        )
    specs: list[PromptSpec] = []
    problems: dict[str, str] = {}
    for f in files:
        try:
            specs.append(load_prompt(f))
        except PromptError as e:
            problems[f.name] = str(e)
    seen: dict[str, str] = {}
    for s in specs:
        if s.name in seen:
            raise PromptError(
                f"{seen[s.name]} and {s.source} both have the name {s.name!r}; "
                "give one of them a different `name:` setting or file name"
            )
        seen[s.name] = s.source
    return specs, problems


def _parse_text(src: str, text: str) -> tuple[dict[str, Any], list[Turn]]:
    lines = text.split("\n")
    settings: dict[str, Any] = {}
    if lines[0].rstrip() == "---":
        end = next((i for i in range(1, len(lines)) if lines[i].rstrip() == "---"), None)
        if end is None:
            raise PromptError(
                f"{src}: front matter opened with '---' on line 1 is never closed; add a line '---' after the settings"
            )
        settings = parse_yaml("\n".join(lines[1:end]), src, PromptError, what="front matter", line_offset=1)
        if settings is None:
            settings = {}
        if not isinstance(settings, dict):
            raise PromptError(
                f"{src}: front matter must be a YAML mapping of settings (key: value), got a {type(settings).__name__}"
            )
        lines = lines[end + 1 :]
        if not "\n".join(lines).strip():
            raise PromptError(f"{src}: has front matter but no prompt text after it; add the prompt below the '---'")
    _check_keys(src, settings, SETTINGS_KEYS, "front matter")

    # Text before the first marker is a system turn if it is not blank.
    chunks: list[tuple[str, list[str], bool]] = [("system", [], False)]  # role, lines, explicit
    for line in lines:
        m = _MARKER.match(line)
        if not m:
            chunks[-1][1].append(line)
        elif m.group(1).lower() in ROLES:
            chunks.append((m.group(1).lower(), [], True))
        else:
            raise PromptError(
                f"{src}: unknown turn role {m.group(1)!r} in marker {short_repr(line.strip())}; "
                f"use one of {', '.join(ROLES)}"
            )
    turns: list[Turn] = []
    for role, body, explicit in chunks:
        content = "\n".join(body).strip()
        if content:
            turns.append(Turn(role, content))
        elif explicit:
            raise PromptError(
                f"{src}: turn {len(turns) + 1} ({role}) is empty; write its text below the marker or remove the marker"
            )
    return settings, turns


def _parse_data(src: str, text: str, ext: str) -> tuple[dict[str, Any], list[Turn]]:
    if ext == ".json":
        data = parse_json(text, src, PromptError)
    else:
        data = parse_yaml(text, src, PromptError)
    if isinstance(data, list):
        settings, raw_turns = {}, data
    elif isinstance(data, dict):
        if "turns" not in data:
            raise PromptError(
                f"{src}: the mapping has no 'turns' key; add `turns:` with a list of "
                "{role, content} turns (or make the file a list of turns)"
            )
        settings = {k: v for k, v in data.items() if k != "turns"}
        raw_turns = data["turns"]
        _check_keys(src, settings, ("turns",) + SETTINGS_KEYS, "top level")
    else:
        raise PromptError(
            f"{src}: must be a list of turns or a mapping with 'turns:' and settings, "
            f"got {'nothing' if data is None else 'a ' + type(data).__name__}"
        )
    if not isinstance(raw_turns, list) or not raw_turns:
        raise PromptError(f"{src}: 'turns' must be a non-empty list of {{role, content}} mappings")
    turns = []
    for i, t in enumerate(raw_turns, 1):
        if not isinstance(t, dict) or set(t) != {"role", "content"}:
            raise PromptError(
                f"{src}: turn {i} must be a mapping with exactly the keys 'role' and 'content', got {short_repr(t)}"
            )
        role, content = t["role"], t["content"]
        if role not in ROLES:
            raise PromptError(f"{src}: turn {i} has role {short_repr(role)}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise PromptError(f"{src}: turn {i} ({role}) must have non-empty text content, got {short_repr(content)}")
        turns.append(Turn(role, content.strip()))
    return settings, turns


def _check_keys(src: str, d: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = [k for k in d if k not in allowed]
    if unknown:
        raise PromptError(
            f"{src}: unknown {where} key(s) {', '.join(map(short_repr, unknown[:10]))}; "
            f"allowed keys are {', '.join(allowed)}"
        )


def _check_turn_order(src: str, turns: list[Turn]) -> None:
    if not turns:
        raise PromptError(f"{src}: has no prompt text; write the prompt into it")
    for i, t in enumerate(turns):
        if t.role == "system":
            if i != 0:
                raise PromptError(f"{src}: turn {i + 1} is a system turn; only the first turn may be a system turn")
            continue
        expected = "user" if (i - (turns[0].role == "system")) % 2 == 0 else "assistant"
        if t.role != expected:
            raise PromptError(
                f"{src}: turn {i + 1} is {_a(t.role)} turn but {_a(expected)} turn was expected; "
                "after the optional system turn, turns must alternate user, assistant, user, ..."
            )


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


# ---------------------------------------------------------------------------- settings


def slugify(text: str) -> str:
    """Lower-case ASCII slug matching ``[a-z0-9][a-z0-9_-]*`` ("" if nothing is left)."""
    s = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    s = re.sub(r"[^a-z0-9_-]+", "-", s)
    return re.sub(r"^[_-]+", "", s).rstrip("-_")


def _build_spec(src: str, stem: str, st: dict[str, Any], turns: list[Turn]) -> PromptSpec:
    def bad(msg: str) -> PromptError:
        return PromptError(f"{src}: {msg}")

    raw_name = st.get("name", stem)
    if not isinstance(raw_name, str):
        raise bad(f"name must be a string, got {short_repr(raw_name)}; quote it")
    name = slugify(raw_name)
    if not name:
        raise bad(f"name {short_repr(raw_name)} has no ASCII letters or digits; use a name like 'shell-agent'")

    max_turns = st.get("max_turns", DEFAULT_MAX_TURNS)
    lo, hi = MAX_TURNS_RANGE
    if isinstance(max_turns, bool) or not isinstance(max_turns, int) or not lo <= max_turns <= hi:
        raise bad(f"max_turns must be an integer from {lo} to {hi}, got {short_repr(max_turns)}")

    env = st.get("environment") or {}
    if not isinstance(env, dict):
        raise bad(f"environment must be a mapping with keys {', '.join(ENVIRONMENT_KEYS)}, got {short_repr(env)}")
    _check_keys(src, env, ENVIRONMENT_KEYS, "environment")
    env_values = {}
    for key, default in zip(ENVIRONMENT_KEYS, (DEFAULT_ENV_DESCRIPTION, DEFAULT_END_CONDITION, DEFAULT_END_TOKEN)):
        v = env.get(key, default)
        if not isinstance(v, str) or not v.strip():
            raise bad(f"environment.{key} must be a non-empty string, got {short_repr(v)}")
        env_values[key] = v.strip()
    if re.search(r"\s", env_values["end_token"]):
        raise bad(f"environment.end_token must not contain whitespace, got {env_values['end_token']!r}")

    inputs = _string_list(src, st.get("example_inputs", []), "example_inputs")

    af = st.get("action_format") or {}
    if not isinstance(af, dict):
        raise bad(f"action_format must be a mapping with keys {', '.join(ACTION_FORMAT_KEYS)}, got {short_repr(af)}")
    _check_keys(src, af, ACTION_FORMAT_KEYS, "action_format")
    regexes = {}
    for key in ACTION_FORMAT_KEYS:
        pats = _string_list(src, af.get(key, []), f"action_format.{key}", strip=False)
        for i, pat in enumerate(pats):
            try:
                patterns.compiled(pat)
            except patterns.error as e:
                raise bad(f"action_format.{key}[{i}] is not a valid regex ({e}): {short_repr(pat)}") from None
            if slow := patterns.check_speed(pat):
                raise bad(f"action_format.{key}[{i}]: {slow}")
        regexes[key] = pats

    return PromptSpec(
        name=name,
        source=src,
        turns=tuple(turns),
        max_turns=max_turns,
        environment=EnvironmentSpec(**env_values),
        example_inputs=inputs,
        action_format=ActionFormat(actions=regexes["actions"], final=regexes["final"]),
    )


def _string_list(src: str, value: Any, key: str, strip: bool = True) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise PromptError(f"{src}: {key} must be a list of non-empty strings, got {short_repr(value)}")
    return tuple(v.strip() if strip else v for v in value)
