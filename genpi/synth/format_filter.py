"""The action-format filter: role-played turns that break the prompt's format are not kept.

A conversation is cut before its first agent turn that no ``action_format.actions`` regex
matches: that turn and everything after it (which answers it) would teach the wrong format.
Prompts without action regexes are left as they are.
"""

from __future__ import annotations

from genpi.prompt.spec import PromptSpec


def cut_at_off_format(spec: PromptSpec, turns: list[dict]) -> list[dict]:
    """``turns`` before the first agent turn out of the prompt's action format (all without regexes)."""
    fmt = spec.action_format
    if not fmt.has_actions:
        return list(turns)
    for k, turn in enumerate(turns):
        if not fmt.is_action(turn["agent"]):
            return list(turns[:k])
    return list(turns)


def filter_record(spec: PromptSpec, record: dict, enabled: bool) -> dict:
    """``record`` with its turns filtered (when ``enabled``) and ``turns_generated``, the count before."""
    turns = cut_at_off_format(spec, record["turns"]) if enabled else list(record["turns"])
    return {**record, "turns": turns, "turns_generated": len(record["turns"])}
