"""Train / validation / test split of a prompt's records, derived from record ids alone.

The split is not stored with the data: any stage recomputes it from the ids and the split
config, and test records are never trained on. Synthesis role-plays only the records training
reads, so the split config is part of the synthesis key.
"""

from __future__ import annotations

from genpi.fingerprint import fingerprint

TRAIN, VAL, TEST = "train", "val", "test"


def assign_splits(ids: list[int], val_fraction: float, test_fraction: float, seed: int) -> dict[int, str]:
    """``{id: "train" | "val" | "test"}``: ids ordered by ``fingerprint([seed, id])``, the first
    ``round(n * test_fraction)`` test, the next ``round(n * val_fraction)`` val, the rest train.
    At least one record is always kept for training (val is shortened first, then test)."""
    order = sorted(set(ids), key=lambda i: fingerprint([seed, i]))
    n = len(order)
    n_test = max(0, min(n - 1, round(n * test_fraction)))
    n_val = max(0, min(n - 1 - n_test, round(n * val_fraction)))
    return {i: TEST if k < n_test else VAL if k < n_test + n_val else TRAIN for k, i in enumerate(order)}
