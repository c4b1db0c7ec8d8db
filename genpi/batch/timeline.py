"""When each stage of a batch had work in flight, and how long the driver's loop sat waiting."""

from __future__ import annotations

import time
from collections import defaultdict


class Timeline:
    """Intervals of in-flight units per stage (from start to outcome, waiting for resources
    included) and the driver loop's waits; shares are of the wall time from creation to :meth:`end`."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.ended: float | None = None
        self.units: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self.waited = 0.0

    def unit(self, stage: str, started: float) -> None:
        """A unit of ``stage`` that was in flight from ``started`` (``time.monotonic()``) until now."""
        self.units[stage].append((started, time.monotonic()))

    def wait(self, seconds: float) -> None:
        self.waited += seconds

    def end(self) -> None:
        self.ended = time.monotonic()

    @property
    def seconds(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    def busy_shares(self) -> dict[str, float]:
        """Each stage's share of the wall time with at least one of its units in flight."""
        return {stage: _covered(spans) / self.seconds for stage, spans in self.units.items()}

    def driver_idle_share(self) -> float:
        """The share of the wall time the driver's loop spent blocked, waiting for an outcome."""
        return self.waited / self.seconds


def _covered(spans: list[tuple[float, float]]) -> float:
    """The length of the union of ``spans``."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total
