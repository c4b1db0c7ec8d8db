"""One engine, one thread: requests that arrive together become one ``generate`` call.

A replica's requests (any adapter, or none) queue here; the thread takes the first and waits for
more, and runs them as one call. How long it waits: when batches just ended, for as many requests
as they held (their clients' next turns: conversations that drifted into two half-full batches
join up again, and a lone client's next turn does not wait at all), at most ``REJOIN_S``;
otherwise up to the batching window. It runs them as one call with an adapter per request, so requests
for different adapters share one forward (the engine's mixed-adapter batch). Requests with
different sampling settings go in separate calls. Engine chores (load an adapter, check it, pin a
prompt's KV, free memory) run on the same thread between batches, in the order they were asked.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from genpi.chat import Conversation
from genpi.engines.base import SamplingParams

log = logging.getLogger(__name__)

Event = dict[str, Any]
REJOIN_S = 0.25  # the longest wait for the clients of batches that just ended


class TextStream:
    """Token ids in, text deltas out, such that the deltas add up to the engine's final text
    (stripped, cut at a stop string): text that may still become a stop string or trailing
    whitespace is held back until it cannot."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.tokens: list[int] = []
        self.sent = ""

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True).lstrip()
        if text.endswith("\ufffd"):  # half of a multi-byte character
            return ""
        hit = min((text.index(s) for s in self.stops if s in text), default=None)
        if hit is not None:
            text = text[:hit]
        else:
            hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[: len(text) - hold]
        return self._advance(text.rstrip())

    def finish(self, final: str) -> str:
        return self._advance(final)

    def reset(self) -> None:
        """Forget the tokens pushed so far (none of their text was sent): the request runs again."""
        self.tokens, self.sent = [], ""

    def _advance(self, text: str) -> str:
        if not text.startswith(self.sent) or len(text) == len(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta


@dataclass
class Job:
    """One request: what to generate, with which adapter (its name, and the folder to reload it
    from), and where its events go (``emit`` is thread-safe)."""

    conversation: Conversation
    params: SamplingParams
    adapter: str | None
    emit: Callable[[Event], None]
    stream: TextStream | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # added to the final event
    streamed: bool = False  # a delta was sent: the request cannot be run again


class Batcher:
    """The engine's thread: batches of jobs, and chores in between."""

    def __init__(self, engine: Any, window_s: float, max_batch: int, tidy: Callable[[], None]) -> None:
        self.engine, self.window_s, self.max_batch, self.tidy = engine, window_s, max_batch, tidy
        self.queue: queue.Queue[Job | tuple[Callable[[], Any], Future] | None] = queue.Queue()
        self.batches = 0
        self.ended: list[tuple[float, float, int]] = []  # recent batches: when each ended, its seconds, its requests
        self.thread = threading.Thread(target=self._run, name="genpi-engine", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.queue.put(job)

    async def call(self, chore: Callable[[], Any]) -> Any:
        """Run ``chore`` on the engine's thread (after what is queued before it); its result."""
        future: Future = Future()
        self.queue.put((chore, future))
        return await asyncio.wrap_future(future)

    def stop(self) -> None:
        self.queue.put(None)

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            try:
                if not self._serve(item):
                    return
            except Exception:  # the thread must outlive anything: every later request depends on it
                log.exception("the engine thread went on after an error")

    def _serve(self, item: Job | tuple[Callable[[], Any], Future]) -> bool:
        """Run one chore, or a batch that starts with ``item``; False when told to stop."""
        if not isinstance(item, Job):
            self._chore(*item)
            return True
        batch, chores = [item], []
        now = time.monotonic()
        expected = self._returning(now)
        want = min(self.max_batch, expected) if expected else self.max_batch
        deadline = now + (max(REJOIN_S, self.window_s) if expected else self.window_s)
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic() if len(batch) < want else 0
            if left <= 0 and self.queue.empty():
                break
            try:
                more = self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(more, Job):
                batch.append(more)
                continue
            chores.append(more)  # it waits for this batch; so does everything queued after it
            break
        started = time.monotonic()
        try:
            self._generate(batch)
        except Exception:  # its requests got their errors; the chores after it still run
            log.exception("a batch of %d failed", len(batch))
        ended = time.monotonic()
        self.ended = [*self.ended[-15:], (ended, ended - started, len(batch))]
        for chore in chores:
            if chore is None:
                return False
            self._chore(*chore)
        return True

    def _returning(self, now: float) -> int:
        """Requests of the batches that ended within the last batch's time (plus a second): their
        clients' next turns are likely on their way (or queued already)."""
        if not self.ended:
            return 0
        horizon = self.ended[-1][1] + 1.0
        return sum(size for ended, _, size in self.ended if now - ended <= horizon)

    def _chore(self, chore: Callable[[], Any], future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return  # whoever asked for it left before it ran (a client that gave up)
        try:
            result = chore()
        except BaseException as e:  # handed to the awaiting coroutine
            future.set_exception(e)
        else:
            future.set_result(result)

    def _generate(self, batch: list[Job]) -> None:
        """Each sampling setting's jobs as one call. A call that fails fails only its own jobs: on
        their own again, those that have sent nothing yet, so one bad request spoils no other."""
        groups: dict[SamplingParams, list[Job]] = {}
        for job in batch:
            groups.setdefault(job.params, []).append(job)
        try:
            for adapter in {job.adapter for job in batch} - {None} - set(self.engine.adapters):
                self.engine.add_adapter(adapter)  # unloaded (evicted) while its request waited: the folder stays
        except Exception as e:
            log.exception("loading an adapter for a batch of %d failed", len(batch))
            _fail(batch, e)
            return
        for params, jobs in groups.items():
            try:
                self._call(params, jobs)
            except Exception as e:
                log.exception("a call of %d requests failed", len(jobs))
                for job in jobs:
                    if len(jobs) == 1 or job.streamed:
                        _fail([job], e)
                        continue
                    if job.stream is not None:
                        job.stream.reset()  # tokens it held back from the failed call
                    try:
                        self._call(params, [job])
                    except Exception as alone:
                        _fail([job], alone)
        self.tidy()

    def _call(self, params: SamplingParams, jobs: list[Job]) -> None:
        def on_token(i: int, token: int) -> None:
            stream = jobs[i].stream
            if stream is not None and (delta := stream.push(token)):
                jobs[i].streamed = True
                jobs[i].emit({"delta": delta})

        gens = self.engine.generate(
            [j.conversation for j in jobs],
            params,
            [j.adapter for j in jobs],
            on_token=on_token if any(j.stream for j in jobs) else None,
        )
        self.batches += 1
        for job, gen in zip(jobs, gens):
            if job.stream is not None and (delta := job.stream.finish(gen.text)):
                job.emit({"delta": delta})
            job.emit(
                {
                    "done": {
                        "text": gen.text,
                        "finish_reason": gen.finish_reason,
                        "batch": len(jobs),
                        "prompt_tokens": gen.prompt_tokens,
                        "completion_tokens": gen.output_tokens,
                        **job.extra,
                    }
                }
            )


def _fail(jobs: list[Job], error: Exception) -> None:
    for job in jobs:
        job.emit({"error": f"generation failed: {error}"})
