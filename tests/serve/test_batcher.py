"""The replica's engine thread with a scripted engine: who shares a batch, and failures mid-batch."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

from genpi.engines.base import Generation, SamplingParams
from genpi.serve.batcher import Batcher, Job

PARAMS = SamplingParams(max_new_tokens=4)


class ScriptedEngine:
    """Answers each conversation with its own text after ``seconds``; ``fail`` raises after the first token."""

    def __init__(self, seconds: float = 0.05) -> None:
        self.seconds, self.fail = seconds, False
        self.adapters: list[str] = []
        self.calls: list[int] = []

    def add_adapter(self, name: str) -> str:
        self.adapters.append(name)
        return name

    def generate(self, conversations: list, params: SamplingParams, adapters: list, on_token: Any = None) -> list:
        self.calls.append(len(conversations))
        if on_token is not None:
            for i in range(len(conversations)):
                on_token(i, 7)
        if self.fail:
            raise RuntimeError("the device fell over")
        if any("bad" in c[-1]["content"] for c in conversations):
            raise ValueError("a request this engine cannot take")
        time.sleep(self.seconds)
        return [Generation(c[-1]["content"], "stop", 3, 1) for c in conversations]


class Token:
    """A stream that turns every token into the delta ``tok``."""

    def push(self, token: int) -> str:
        return "tok"

    def finish(self, final: str) -> str:
        return ""

    def reset(self) -> None:
        pass


@contextmanager
def running(engine: Any, window_s: float) -> Iterator[Batcher]:
    """A batcher on ``engine``, stopped when the block ends."""
    batcher = Batcher(engine, window_s=window_s, max_batch=16, tidy=lambda: None)
    try:
        yield batcher
    finally:
        batcher.stop()


def job(text: str, events: queue.Queue, stream: bool = False) -> Job:
    return Job([{"role": "user", "content": text}], PARAMS, None, events.put, Token() if stream else None)


def events_of(events: queue.Queue, count: int) -> list[dict]:
    return [events.get(timeout=10) for _ in range(count)]


def test_clients_of_a_batch_that_just_ended_rejoin_one_batch() -> None:
    engine = ScriptedEngine()
    events: queue.Queue = queue.Queue()
    with running(engine, window_s=0.0) as batcher:
        for k in range(3):
            batcher.submit(job(f"first {k}", events))
        events_of(events, 3)
        assert engine.calls == [3]
        batcher.submit(job("second 0", events))  # two clients answer at once, the third a little later
        batcher.submit(job("second 1", events))
        time.sleep(0.1)
        batcher.submit(job("second 2", events))
        events_of(events, 3)
        assert engine.calls == [3, 3]  # with no window at all, the late one still joined


def test_a_lone_clients_next_turn_does_not_wait_for_the_window() -> None:
    engine = ScriptedEngine(seconds=0.0)
    events: queue.Queue = queue.Queue()
    with running(engine, window_s=0.5) as batcher:
        batcher.submit(job("turn 1", events))
        events_of(events, 1)
        started = time.monotonic()
        batcher.submit(job("turn 2", events))
        events_of(events, 1)
        assert time.monotonic() - started < 0.4  # the first turn waited out the window; the next did not


def test_a_batch_that_fails_mid_stream_sends_its_requests_the_error_and_the_thread_goes_on() -> None:
    engine = ScriptedEngine()
    events: queue.Queue = queue.Queue()
    with running(engine, window_s=0.0) as batcher:
        engine.fail = True
        batcher.submit(job("doomed", events, stream=True))
        delta, error = events_of(events, 2)
        assert delta == {"delta": "tok"} and "the device fell over" in error["error"]
        engine.fail = False
        batcher.submit(job("next", events))
        (done,) = events_of(events, 1)
        assert done["done"]["text"] == "next"


def test_one_bad_request_fails_alone_and_its_sampling_group_is_rerun_without_it() -> None:
    engine = ScriptedEngine()
    events: dict[str, queue.Queue] = {name: queue.Queue() for name in ("good", "bad", "other")}
    with running(engine, window_s=0.2) as batcher:
        batcher.submit(job("good", events["good"]))
        batcher.submit(job("bad", events["bad"]))
        sampled = job("other", events["other"])
        sampled.params = SamplingParams(max_new_tokens=4, temperature=0.5)
        batcher.submit(sampled)
        assert events_of(events["good"], 1)[0]["done"]["text"] == "good"
        assert "cannot take" in events_of(events["bad"], 1)[0]["error"]
        assert events_of(events["other"], 1)[0]["done"]["text"] == "other"
        assert sorted(engine.calls) == [1, 1, 1, 2]  # the pair failed together, then each alone


def test_a_chore_whose_caller_left_is_skipped_and_the_thread_goes_on() -> None:
    engine = ScriptedEngine()
    events: queue.Queue = queue.Queue()
    ran: list[str] = []
    with running(engine, window_s=0.0) as batcher:
        left: Future = Future()
        left.cancel()  # a client that gave up while its adapter was waiting to load
        batcher.queue.put((lambda: ran.append("left"), left))
        batcher.submit(job("next", events))
        assert events_of(events, 1)[0]["done"]["text"] == "next"
        assert ran == [] and batcher.thread.is_alive()


class HoldBack:
    """A stream that holds back all its text until the end (as a possible stop string does)."""

    def __init__(self) -> None:
        self.tokens: list[int] = []

    def push(self, token: int) -> str:
        self.tokens.append(token)
        return ""

    def finish(self, final: str) -> str:
        return final

    def reset(self) -> None:
        self.tokens = []


def test_a_streaming_request_rerun_alone_starts_its_stream_afresh() -> None:
    engine = ScriptedEngine()
    good, bad = queue.Queue(), queue.Queue()
    with running(engine, window_s=0.2) as batcher:
        streaming = Job([{"role": "user", "content": "good"}], PARAMS, None, good.put, HoldBack())
        batcher.submit(streaming)
        batcher.submit(job("bad", bad))
        delta, done = events_of(good, 2)
        assert delta == {"delta": "good"} and done["done"]["text"] == "good"
        assert streaming.stream.tokens == [7]  # the failed call's token is forgotten
        assert "cannot take" in events_of(bad, 1)[0]["error"]
