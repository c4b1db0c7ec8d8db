"""The near-tie walk of the parity check (:func:`genpi.parity.near_ties`) on a scripted model whose
tokens are characters."""

from __future__ import annotations

from genpi import parity

TRAINED = "Act: ls /tmp"


def model(departs_at: int | None = None, gap: float = 0.0, in_top: bool = True, end_at: int | None = None):
    """A greedy continuation that follows TRAINED, except at ``departs_at`` (it picks ``#``, with the
    trained character ``gap`` nats below, or outside its top tokens) or ending the turn at ``end_at``."""

    def greedy(forced: list[int], n: int) -> tuple[list[int], list[dict[int, float]]]:
        text, tokens, tops = "".join(map(chr, forced)), [], []
        for _ in range(n):
            k = len(text)
            want = ord(TRAINED[k]) if TRAINED.startswith(text) and k < len(TRAINED) else ord("#")
            top = {want: -0.5, ord("~"): -4.0}
            if k == departs_at and TRAINED.startswith(text):
                top = {ord("#"): -0.5, **({want: -0.5 - gap} if in_top else {ord("~"): -4.0})}
            if k == end_at:
                top = {ord("$"): -0.1, want: -2.0}
            token = max(top, key=top.__getitem__)
            tokens.append(token)
            tops.append(top)
            text += chr(token)
            if token == ord("$"):
                break
        return tokens, tops

    return greedy


def decode(ids: list[int]) -> str:
    return "".join("<|end|>" if t == ord("$") else chr(t) for t in ids)


def test_the_trained_answer_itself_passes() -> None:
    assert parity.near_ties(TRAINED, model(), decode) is None


def test_a_departure_at_a_near_tie_passes() -> None:
    assert parity.near_ties(TRAINED, model(departs_at=4, gap=0.0), decode) is None
    assert parity.near_ties(TRAINED, model(departs_at=4, gap=parity.NEAR_TIE_NATS), decode) is None


def test_a_departure_past_the_margin_or_outside_the_top_fails_saying_where() -> None:
    why = parity.near_ties(TRAINED, model(departs_at=4, gap=1.0), decode)
    assert why is not None and "1.00 nats below" in why and "'Act:'" in why
    why = parity.near_ties(TRAINED, model(departs_at=2, in_top=False), decode)
    assert why is not None and f"outside the top {parity.TOP_LOGPROBS}" in why


def test_an_early_end_of_turn_is_a_departure() -> None:
    why = parity.near_ties(TRAINED, model(end_at=6), decode)
    assert why is not None and "1.90 nats below" in why and "<|end|>" in why


VOCAB = ["a", "b", "b.", ".", "X", "~"]  # tokens that are strings: "b." is one token, or "b" then "."


def scripted(tops: dict[str, dict[int, float]]):
    """A greedy continuation over VOCAB whose top tokens after each text are ``tops[text]``."""

    def greedy(forced: list[int], n: int) -> tuple[list[int], list[dict[int, float]]]:
        text, tokens, steps = decode_vocab(forced), [], []
        while len(tokens) < n and text in tops:
            steps.append(tops[text])
            tokens.append(max(steps[-1], key=steps[-1].__getitem__))
            text += VOCAB[tokens[-1]]
        return tokens, steps

    return greedy


def decode_vocab(ids: list[int]) -> str:
    return "".join(VOCAB[t] for t in ids)


def test_a_near_tie_split_of_the_text_that_leads_astray_is_walked_past() -> None:
    """Greedy takes "b" where the trained answer has "b." (a near tie, or past it), and after "ab"
    the model wants "X" by far. The walk from the other split follows the trained text; past the
    margin there is no such walk and the first walk's failure stands. The same where greedy leaves
    the text at once and both splits are near ties: the best fit fails, the other passes."""
    after_ab = {4: -0.1, 3: -3.0}
    near = scripted({"": {0: -0.1, 5: -5.0}, "a": {1: -0.6, 2: -0.7, 5: -5.0}, "ab": after_ab})
    assert parity.near_ties("ab.", near, decode_vocab) is None
    departing = scripted({"": {0: -0.1}, "a": {4: -0.5, 1: -0.6, 2: -0.65}, "ab": after_ab})
    assert parity.near_ties("ab.", departing, decode_vocab) is None
    far = scripted({"": {0: -0.1, 5: -5.0}, "a": {1: -0.6, 2: -1.6, 5: -5.0}, "ab": after_ab})
    why = parity.near_ties("ab.", far, decode_vocab)
    assert why is not None and "after 'ab'" in why and "2.90 nats below" in why


def test_a_failed_probe_quotes_the_answers_where_they_part() -> None:
    class Engine:
        def generate(self, conversations, params, adapters):
            return [type("Generation", (), {"text": "Think: " + "x" * 70 + " then Act"})()]

    probe = {"messages": [{"role": "user", "content": "q"}], "reply": "Think: " + "x" * 70 + " then stop"}
    why = parity.verdict(Engine(), "adapter", [probe])
    assert why is not None and "answered ...'" + "x" * 14 + " then Act'" in why and "x then stop'" in why
