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
