"""Tests for genpi.prompt.files: the prompt folder format, its errors, and the shipped prompts."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from genpi.errors import PromptError
from genpi.prompt.files import load_prompt, load_prompts, slugify
from genpi.prompt.spec import (
    ActionFormat,
    EnvironmentSpec,
    PromptSpec,
    Turn,
    check_prompt_lengths,
)
from tests.repo import PROMPTS as SHIPPED

# How each shipped prompt marks an environment observation; any other user turn after an
# agent turn starts a new episode, so the agent turn before it must be a final action.
OBSERVATION_PREFIX = {
    "shell-agent": ("Output:",),
    "web-shop-agent": ("Observation:",),
    "support-agent": ("RESULT ", "ERROR "),
}

MD_WITH_TURNS = """\
---
name: My Agent!
max_turns: 3
---
You are a test agent.
<!-- turn: user -->
Task: count.
  <!--Turn:Assistant-->  
Act: ls
<!-- turn: user -->
Output: 3
<!-- turn: assistant -->
Act: answer(3)
<!-- turn: user -->
New task:
"""


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content, encoding="utf-8")
    return p


def expect_error(path: Path, *fragments: str) -> str:
    with pytest.raises(PromptError) as e:
        load_prompt(path)
    msg = str(e.value)
    assert str(path) in msg
    for f in fragments:
        assert f in msg, msg
    return msg


def token_lower_bound(text: str) -> int:
    # Dependency-free proxy: English text runs about 1.3 tokens per whitespace-separated
    # word with Llama-like and SmolLM2 tokenizers (the SmolLM2 tokenizer counts these prompts
    # at 1.6-1.9 tokens per word), so words * 1.3 is a conservative estimate.
    return int(len(text.split()) * 1.3)


# ---------------------------------------------------------------------------- parsing


def test_markdown_with_front_matter_and_markers(tmp_path: Path) -> None:
    spec = load_prompt(write(tmp_path, "a.md", MD_WITH_TURNS))
    assert spec.name == "my-agent"
    assert spec.max_turns == 3
    assert [t.role for t in spec.turns] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert spec.turns[0] == Turn("system", "You are a test agent.")
    assert spec.turns[-1].content == "New task:"
    assert spec.gold_turns() == 2
    assert spec.environment == EnvironmentSpec()
    assert spec.example_inputs == () and spec.action_format == ActionFormat()
    assert spec.source == str(tmp_path / "a.md")
    assert re.fullmatch(r"[0-9a-f]{12}", spec.prompt_hash)
    assert spec.id == f"my-agent-{spec.prompt_hash[:8]}"


def test_plain_text_is_one_system_turn_and_name_defaults_to_stem(tmp_path: Path) -> None:
    spec = load_prompt(write(tmp_path, "Plain Prompt.txt", "\ufeffLine one.\r\n\r\nLine two.\r\n"))
    assert spec.name == "plain-prompt"
    assert spec.turns == (Turn("system", "Line one.\n\nLine two."),)
    assert spec.max_turns == 5 and spec.environment.end_token == "<END>"


def test_marker_first_means_no_system_turn(tmp_path: Path) -> None:
    spec = load_prompt(write(tmp_path, "b.markdown", "\n\n<!-- turn: user -->\nhi\n<!-- turn: assistant -->\nhello\n"))
    assert [t.role for t in spec.turns] == ["user", "assistant"]


def test_json_list_and_yaml_mapping(tmp_path: Path) -> None:
    turns = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]
    spec = load_prompt(write(tmp_path, "j.json", json.dumps(turns)))
    assert spec.turns == (Turn("user", "Q?"), Turn("assistant", "A."))
    y = write(
        tmp_path,
        "y.yml",
        """\
name: y-agent
max_turns: 7
environment: {description: A box., end_condition: it stops., end_token: "[[DONE]]"}
example_inputs: ["first", "  second  "]
action_format: {actions: ['^Act: \\w+'], final: ['^Act: stop']}
turns:
  - {role: system, content: sys}
  - {role: user, content: go}
""",
    )
    spec = load_prompt(y)
    assert spec.name == "y-agent" and spec.max_turns == 7
    assert spec.environment == EnvironmentSpec("A box.", "it stops.", "[[DONE]]")
    assert spec.example_inputs == ("first", "second")
    assert spec.action_format.is_action("x\nAct: go") and not spec.action_format.is_action("go")
    assert spec.action_format.is_final("Act: stop") and not spec.action_format.is_final("Act: go")


def test_slugify() -> None:
    assert slugify("Shell Agent (v2)") == "shell-agent-v2"
    assert slugify("__Café_bot--") == "cafe_bot"
    assert slugify("!!!") == ""


def test_action_format_without_regexes() -> None:
    af = ActionFormat()
    assert not af.has_actions and not af.has_final
    assert not af.is_action("anything") and not af.is_final("anything")


# ---------------------------------------------------------------------------- file errors


@pytest.mark.parametrize(
    "name,content,fragments",
    [
        ("e.md", "", ["empty"]),
        ("e.txt", "  \n\t\n", ["empty"]),
        ("e.md", "---\nname: x\n---\n\n  \n", ["no prompt text"]),
        ("e.md", b"caf\xe9 latte", ["UTF-8"]),
        ("e.txt", b"abc\x00def", ["binary"]),
        ("e.docx", "hello", ["extension", ".md", ".json", ".yaml"]),
        ("e.md", "---\nname: ok\nmax_turns: 3\n  bad: x\n---\nbody", ["not valid YAML", "line 4"]),
        ("e.md", "---\n- a\n- b\n---\nbody", ["mapping"]),
        ("e.md", "---\nnmae: x\n---\nbody", ["'nmae'", "name, max_turns, environment, example_inputs, action_format"]),
        ("e.md", "---\nmax_turns: ten\n---\nbody", ["max_turns must be an integer from 1 to 50, got 'ten'"]),
        ("e.md", "---\nmax_turns: 0\n---\nbody", ["max_turns"]),
        ("e.md", "---\nmax_turns: 51\n---\nbody", ["max_turns"]),
        ("e.md", "---\nmax_turns: true\n---\nbody", ["max_turns"]),
        ("e.md", "---\nname: x\nbody without closing", ["never closed"]),
        ("e.md", "---\nname: '***'\n---\nbody", ["name"]),
        ("e.md", "---\nname: 12\n---\nbody", ["name must be a string"]),
        ("e.md", "---\nenvironment: {end_token: 'a b'}\n---\nbody", ["end_token", "whitespace"]),
        ("e.md", "---\nenvironment: {colour: red}\n---\nbody", ["'colour'", "description, end_condition, end_token"]),
        ("e.md", "---\nenvironment: {description: ''}\n---\nbody", ["environment.description"]),
        ("e.md", "---\nenvironment: nope\n---\nbody", ["environment must be a mapping"]),
        ("e.md", "---\nexample_inputs: just one\n---\nbody", ["example_inputs must be a list"]),
        ("e.md", "---\nexample_inputs: ['ok', '']\n---\nbody", ["example_inputs"]),
        (
            "e.md",
            "---\naction_format: {actions: ['^Act: (bash']}\n---\nbody",
            ["action_format.actions[0]", "^Act: (bash"],
        ),
        ("e.md", "---\naction_format: {final: ['ok', '[x']}\n---\nbody", ["action_format.final[1]", "[x"]),
        ("e.md", "---\naction_format: {acts: []}\n---\nbody", ["'acts'", "actions, final"]),
        ("e.md", "---\nturns: []\n---\nbody", ["'turns'"]),
        ("e.md", "---\nname: a\nmax_turns: 2\nname: b\n---\nbody", ["line 4", "'name' appears twice", "line 2"]),
    ],
)
def test_file_errors(tmp_path: Path, name: str, content: str | bytes, fragments: list[str]) -> None:
    expect_error(write(tmp_path, name, content), *fragments)


@pytest.mark.parametrize(
    "body,fragments",
    [
        ("<!-- turn: assistant -->\nhi", ["turn 1", "assistant", "user turn was expected"]),
        ("sys\n<!-- turn: user -->\na\n<!-- turn: user -->\nb", ["turn 3", "assistant turn was expected"]),
        ("<!-- turn: user -->\na\n<!-- turn: system -->\nb", ["turn 2", "only the first turn"]),
        ("<!-- turn: user -->\n\n   \n<!-- turn: assistant -->\nb", ["turn 1", "empty"]),
        ("<!-- turn: user -->\na\n<!-- turn: tool -->\nb", ["'tool'", "system, user, assistant"]),
    ],
)
def test_bad_turns_in_text(tmp_path: Path, body: str, fragments: list[str]) -> None:
    expect_error(write(tmp_path, "t.md", body), *fragments)


@pytest.mark.parametrize(
    "name,content,fragments",
    [
        ("d.json", '{"turns": [{"role": "user", "content": "a"},]}', ["invalid JSON", "line 1"]),
        ("d.yaml", "turns:\n  - role: user\n    content: [a\n", ["not valid YAML", "line"]),
        ("d.json", '{"name": "x"}', ["no 'turns' key"]),
        ("d.json", '"just a string"', ["list of turns or a mapping"]),
        ("d.json", '{"turns": []}', ["non-empty list"]),
        (
            "d.json",
            '{"turns": [{"role": "user", "content": "a"}], "colour": 1}',
            ["'colour'", "turns, name, max_turns"],
        ),
        ("d.json", '[{"role": "user"}]', ["turn 1", "'role' and 'content'"]),
        ("d.json", '[{"role": "bot", "content": "a"}]', ["turn 1", "'bot'"]),
        ("d.json", '[{"role": "user", "content": "  "}]', ["turn 1", "non-empty"]),
        ("d.json", '[{"role": "user", "content": 5}]', ["turn 1", "non-empty"]),
        ("d.json", '[{"role": "user", "content": "a", "content": "b"}]', ["key 'content' twice", "keep one"]),
        ("d.yaml", "turns: [{role: user, content: a}]\nturns: [{role: user, content: b}]\n", ["'turns' appears twice"]),
        (
            "d.yaml",
            "- {role: user, content: a}\n- {role: assistant, content: b}\n- {role: assistant, content: c}\n",
            ["turn 3", "user turn was expected"],
        ),
        (
            "d.yml",
            "- {role: system, content: a}\n- {role: assistant, content: b}\n",
            ["turn 2", "user turn was expected"],
        ),
    ],
)
def test_bad_data_files(tmp_path: Path, name: str, content: str, fragments: list[str]) -> None:
    expect_error(write(tmp_path, name, content), *fragments)


# ---------------------------------------------------------------------------- folders


def test_load_prompts_sorted_and_skips(tmp_path: Path) -> None:
    write(tmp_path, "b.md", "B prompt")
    write(tmp_path, "a.txt", "A prompt")
    write(tmp_path, "README.md", "docs, not a prompt")
    write(tmp_path, "readme.txt", "docs")
    write(tmp_path, ".hidden.md", "")
    (tmp_path / "sub").mkdir()
    assert [s.name for s in load_prompts(tmp_path)] == ["a", "b"]


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(PromptError, match="does not exist"):
        load_prompts(tmp_path / "nope")
    f = write(tmp_path, "file.md", "x")
    with pytest.raises(PromptError, match="not a folder"):
        load_prompts(f)
    empty = tmp_path / "empty"
    empty.mkdir()
    write(empty, "README.md", "only docs")
    with pytest.raises(PromptError, match="no prompt files"):
        load_prompts(empty)


def test_duplicate_names_name_both_files(tmp_path: Path) -> None:
    a = write(tmp_path, "agent.md", "one")
    b = write(tmp_path, "other.md", "---\nname: Agent\n---\ntwo")
    with pytest.raises(PromptError) as e:
        load_prompts(tmp_path)
    assert str(a) in str(e.value) and str(b) in str(e.value) and "'agent'" in str(e.value)


def test_folder_reports_every_bad_file(tmp_path: Path) -> None:
    a = write(tmp_path, "a.md", "")
    b = write(tmp_path, "b.pdf", "x")
    write(tmp_path, "c.md", "fine")
    with pytest.raises(PromptError) as e:
        load_prompts(tmp_path)
    assert str(a) in str(e.value) and str(b) in str(e.value) and "2 prompt files" in str(e.value)


# ---------------------------------------------------------------------------- spec behaviour


def test_hash_stable_across_paths_and_sensitive_to_settings(tmp_path: Path) -> None:
    base = load_prompt(write(tmp_path, "a.md", MD_WITH_TURNS))
    (tmp_path / "elsewhere").mkdir()
    moved = load_prompt(write(tmp_path / "elsewhere", "renamed.md", MD_WITH_TURNS))
    assert moved.prompt_hash == base.prompt_hash and moved.id == base.id and moved.source != base.source
    variants = [
        MD_WITH_TURNS.replace("max_turns: 3", "max_turns: 4"),
        MD_WITH_TURNS.replace("name: My Agent!", "name: other"),
        MD_WITH_TURNS.replace("Output: 3", "Output: 4"),
        MD_WITH_TURNS.replace("---\nYou", "environment: {end_token: '<STOP>'}\n---\nYou"),
        MD_WITH_TURNS.replace("---\nYou", "environment: {description: Elsewhere.}\n---\nYou"),
        MD_WITH_TURNS.replace("---\nYou", "example_inputs: [x]\n---\nYou"),
        MD_WITH_TURNS.replace("---\nYou", "action_format: {final: [stop]}\n---\nYou"),
        MD_WITH_TURNS.replace("<!-- turn: assistant -->\nAct: answer", "<!-- turn: assistant -->\nAct:  answer"),
    ]
    hashes = {base.prompt_hash}
    for i, v in enumerate(variants):
        hashes.add(load_prompt(write(tmp_path, f"v{i}.md", v)).prompt_hash)
    assert len(hashes) == len(variants) + 1


def test_json_round_trip(tmp_path: Path) -> None:
    for spec in load_prompts(SHIPPED) + [load_prompt(write(tmp_path, "a.md", MD_WITH_TURNS))]:
        d = json.loads(json.dumps(spec.to_json()))
        back = PromptSpec.from_json(d)
        assert back == spec and back.to_json() == spec.to_json() and back.id == spec.id


def test_hand_built_spec_computes_hash() -> None:
    turns = (Turn("user", "hi"),)
    a = PromptSpec(name="x", source="a", turns=turns)
    b = PromptSpec(name="x", source="b", turns=list(turns))  # type: ignore[arg-type]
    assert a.prompt_hash and a.prompt_hash == b.prompt_hash and b.turns == turns
    assert PromptSpec(name="x", source="a", turns=turns, max_turns=6).prompt_hash != a.prompt_hash


def test_messages_with_input_placement() -> None:
    ends_user = PromptSpec(name="a", source="a", turns=(Turn("system", "S"), Turn("user", "Task:")))
    assert ends_user.messages_with_input("do it") == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Task:\n\ndo it"},
    ]
    ends_agent = PromptSpec(name="b", source="b", turns=(Turn("user", "U"), Turn("assistant", "A")))
    assert ends_agent.messages_with_input("do it")[-1] == {"role": "user", "content": "do it"}
    assert len(ends_agent.messages_with_input("do it")) == 3
    system_only = PromptSpec(name="c", source="c", turns=(Turn("system", "S"),))
    assert [m["role"] for m in system_only.messages_with_input("x")] == ["system", "user"]
    # The spec itself is not mutated.
    assert ends_user.turns[-1].content == "Task:"


def test_example_exchanges_and_text(tmp_path: Path) -> None:
    spec = load_prompt(write(tmp_path, "a.md", MD_WITH_TURNS))
    assert spec.example_exchanges() == [("Act: ls", "Output: 3"), ("Act: answer(3)", "New task:")]
    no_tail = PromptSpec(name="n", source="n", turns=(Turn("user", "U"), Turn("assistant", "A")))
    assert no_tail.example_exchanges() == [("A", "")]
    assert spec.text() == (
        "You are a test agent.\n\n### User\nTask: count.\n\n### Assistant\nAct: ls\n\n"
        "### User\nOutput: 3\n\n### Assistant\nAct: answer(3)\n\n### User\nNew task:"
    )


def test_check_prompt_lengths() -> None:
    specs = [
        PromptSpec(name="short", source="prompts/short.md", turns=(Turn("system", "a b c"),)),
        PromptSpec(name="long", source="prompts/x.md", turns=(Turn("system", "word " * 9321),)),
    ]
    seen: list[list[dict]] = []

    def count(messages: list[dict]) -> int:
        seen.append(messages)
        return sum(len(m["content"].split()) for m in messages)

    check_prompt_lengths(specs[:1], count, 8192, "smollm2-135m-instruct")
    assert seen[0] == specs[0].messages_with_input("")
    with pytest.raises(PromptError) as e:
        check_prompt_lengths(specs, count, 8192, "smollm2-135m-instruct")
    msg = str(e.value)
    assert "prompts/x.md is 9,321 tokens" in msg and "8,192" in msg and "smollm2-135m-instruct" in msg
    assert "shorten the prompt" in msg and "short.md" not in msg


# ---------------------------------------------------------------------------- shipped prompts


def test_shipped_prompts_load() -> None:
    specs = {s.name: s for s in load_prompts(SHIPPED)}
    assert set(specs) == set(OBSERVATION_PREFIX)
    formats = {Path(s.source).suffix for s in specs.values()}
    assert formats == {".md", ".yaml", ".json"}


@pytest.mark.parametrize("name", sorted(OBSERVATION_PREFIX))
def test_shipped_prompt_quality(name: str) -> None:
    spec = next(s for s in load_prompts(SHIPPED) if s.name == name)
    assert token_lower_bound(spec.text()) > 500, len(spec.text().split())
    assert len(spec.example_inputs) >= 5
    assert spec.environment != EnvironmentSpec() and spec.environment.end_token == "<END>"
    assert spec.action_format.has_actions and spec.action_format.has_final
    # The prompt ends with a user turn that introduces the next task, so inputs are appended.
    assert spec.turns[-1].role == "user" and spec.turns[-1].content.endswith(":")

    obs_prefix = OBSERVATION_PREFIX[name]
    episode_lengths, current = [], 0
    for agent_turn, following in spec.example_exchanges():
        assert spec.action_format.is_action(agent_turn), agent_turn
        current += 1
        ends_episode = not following.startswith(obs_prefix)
        assert spec.action_format.is_final(agent_turn) == ends_episode, agent_turn
        if ends_episode:
            episode_lengths.append(current)
            current = 0
    assert current == 0 and max(episode_lengths) >= 2
    # Malformed replies are rejected.
    assert not spec.action_format.is_action("I will just do it.")


def test_shipped_prompts_survive_a_copy(tmp_path: Path) -> None:
    for spec in load_prompts(SHIPPED):
        copy = tmp_path / Path(spec.source).name
        shutil.copy(spec.source, copy)
        assert load_prompt(copy).prompt_hash == spec.prompt_hash
