"""The policy server's engine thread: concurrent chat calls generated together (dynamic batching).

One thread takes the calls waiting and runs one engine call per distinct sampling setting, holding the hub's
``engine_lock`` (the trainer holds it during optimizer steps). A batch runs at once when no other call can join it
(every episode in flight has its call in it, no chat/start/finish request is still on its way, no agent that just
finished an episode while more were queued is still to come back for the next one), else after at most
``max(wait_s, wait_fraction * the last engine call's seconds)``, or at ``max_batch`` calls. An agent expected back
is waited for once: a batch that waits out its window stops expecting the ones still missing.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from critique_rl.agents.runner import generate_from_ids
from critique_rl.rollout.base import Completion, SamplingParams


class _Job:
    __slots__ = ("done", "error", "ids", "params", "queued_at", "result")

    def __init__(self, ids: list[int], params: SamplingParams) -> None:
        self.ids = ids
        self.params = params
        self.done = threading.Event()
        self.result: Completion | None = None
        self.error: BaseException | None = None
        self.queued_at = time.perf_counter()


@dataclass(frozen=True)
class BatchTiming:
    """When one batch's calls arrived and ran (``time.perf_counter`` seconds; kept with ``record=True``)."""

    first_queued: float
    """The batch's first call was queued."""
    last_queued: float
    """Its last call was queued."""
    dispatched: float
    """The engine thread stopped collecting and started the engine call(s)."""
    finished: float
    """The engine call(s) returned and every caller was woken."""
    calls: int


class EngineBatcher:
    """One thread that generates the waiting calls together, then runs one engine call per distinct sampling
    setting, holding ``hub.engine_lock``; calls arriving meanwhile form the next batch.

    When to run a batch: at once when no other call can join it (every episode in flight has its call waiting,
    so a lock-step wave of agents becomes one engine call), else after at most ``max(wait_s, wait_fraction *
    the last engine call's seconds)`` since its first call, or at ``max_batch`` calls."""

    def __init__(self, hub: Any, max_batch: int, wait_s: float, record: bool = False,
                 wait_fraction: float = 0.0) -> None:
        self.hub = hub
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.wait_fraction = wait_fraction
        self.last_engine_s = 0.0
        self.batches: list[tuple[list[list[int]], SamplingParams]] | None = [] if record else None
        self.timeline: list[BatchTiming] | None = [] if record else None
        self.engine_calls = 0
        self.rows = 0
        self.engine_s = 0.0
        self.engine_cpu_s = 0.0
        """CPU seconds of this thread inside engine calls (with torch on one thread: the engine's CPU time)."""
        self.generated_tokens = 0
        self.pending = 0
        """Requests in progress that may still add a call to this batch: chat calls not yet queued, start calls
        while there are episodes to hand out, finish calls."""
        self.expected = 0
        """Agents that finished an episode while more were queued, not yet back with ``episodes/start``: a batch
        waits for them (within its window) as for a request in progress; once a batch waited its whole window,
        the ones still missing are no longer expected."""
        self._cv = threading.Condition()  # guards _jobs, pending, expected, _closed
        self._jobs: deque[_Job] = deque()
        self._closed = False
        self._collecting = False  # a batch is being collected (only then can a pending change make it run early)
        self._thread = threading.Thread(target=self._loop, name="policy-engine", daemon=True)
        self._thread.start()

    def submit(self, ids: list[int], params: SamplingParams, release_pending: bool = False) -> Completion:
        """Generate one completion for ``ids`` (blocks until its batch ran); the engine's error is re-raised.
        ``release_pending``: this call's request was counted in :attr:`pending`; it stops counting as the call is
        queued (one wake-up of the engine thread instead of two)."""
        job = _Job(ids, params)
        with self._cv:
            if release_pending:
                self.pending -= 1
            if self._closed:
                raise RuntimeError("the policy server is shutting down")
            self._jobs.append(job)
            self._cv.notify()
        job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def add_pending(self, delta: int, expect_return: bool = False, returning: bool = False) -> None:
        """A request that may add a call started (+1) or can no longer add one (-1). ``expect_return``: it was a
        finish while episodes are queued (its agent is expected back); ``returning``: it is a start (one expected
        agent is back)."""
        with self._cv:
            self.pending += delta
            if expect_return:
                self.expected += 1
            if returning and self.expected:
                self.expected -= 1
            if self.pending == 0 and self.expected == 0 and self._collecting:  # can now run early: wake the thread
                self._cv.notify()

    def close(self) -> None:
        """Stop after the calls already queued (later submits raise)."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=30)

    def _nobody_else(self, batch_len: int) -> bool:
        """Whether every episode in flight already has its call in this batch (no one else could join)."""
        if self.pending or self.expected or self._jobs:
            return False
        try:
            in_flight = int(self.hub.in_flight())
        except Exception:  # a hub that cannot say: fall back to the time window
            return False
        return in_flight <= batch_len

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._jobs and not self._closed:
                    self._cv.wait()
                if not self._jobs:  # closed and drained
                    return
                batch = [self._jobs.popleft()]
                deadline = time.monotonic() + max(self.wait_s, self.wait_fraction * self.last_engine_s)
                self._collecting = True
                while len(batch) < self.max_batch:
                    while self._jobs and len(batch) < self.max_batch:
                        batch.append(self._jobs.popleft())
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self.expected = 0  # waited a whole window for them: they are not coming back soon
                    if len(batch) >= self.max_batch or left <= 0 or self._closed or self._nobody_else(len(batch)):
                        break
                    self._cv.wait(timeout=left)  # a new call, or the last request that could add one finished
                self._collecting = False
            dispatched = time.perf_counter()
            self._run(batch)
            if self.timeline is not None:
                self.timeline.append(BatchTiming(batch[0].queued_at, max(j.queued_at for j in batch), dispatched,
                                                 time.perf_counter(), len(batch)))

    def _run(self, batch: list[_Job]) -> None:
        groups: dict[tuple, list[_Job]] = {}
        for j in batch:
            p = j.params
            groups.setdefault((p.temperature, p.top_p, p.max_new_tokens, p.greedy, p.n), []).append(j)
        for jobs in groups.values():
            params = jobs[0].params
            ids = [j.ids for j in jobs]
            try:
                engine, tokenizer = self.hub.engine, self.hub.tokenizer
                if engine is None:
                    raise RuntimeError("the policy engine is not loaded yet")
                with self.hub.engine_lock:
                    t0, c0 = time.perf_counter(), time.thread_time()
                    outs = generate_from_ids(engine, tokenizer, ids, params)
                    self.last_engine_s = time.perf_counter() - t0
                    self.engine_s += self.last_engine_s
                    self.engine_cpu_s += time.thread_time() - c0
                if len(outs) != len(jobs):
                    raise RuntimeError(f"the engine returned {len(outs)} results for {len(jobs)} prompts")
                self.engine_calls += 1
                self.rows += len(jobs)
                if self.batches is not None:
                    self.batches.append((ids, params))
                for j, group in zip(jobs, outs, strict=True):
                    j.result = group[0]
                    self.generated_tokens += len(group[0].token_ids)
            except Exception as exc:  # every caller of the failed engine call gets the error
                for j in jobs:
                    j.error = exc
            finally:
                for j in jobs:
                    j.done.set()
