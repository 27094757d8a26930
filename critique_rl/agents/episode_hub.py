"""The episode hub of ``critique-rl serve``: tasks handed out to remote agent loops, their episodes collected back.

The trainer side (:class:`critique_rl.agents.server_source.ServerSource`) asks the hub to play a batch::

    trajs = hub.play(tasks, n, contexts)     # blocks until every slot has a finished episode

Each task becomes ``n`` slots (a GRPO group, contiguous like the in-process runner). The HTTP side
(:mod:`critique_rl.agents.server`) hands slots out with :meth:`EpisodeHub.start`, records the episode's calls
token-exactly into :attr:`LiveEpisode.trajectory` and closes it with :meth:`EpisodeHub.finish`.

Rules, in one place:

- **Whole episodes only.** An episode idle for more than ``idle_timeout`` seconds (no call, no finish) is dropped
  and its slot handed out again with a fresh trajectory; so is one finished on weights more than
  ``max_staleness`` optimizer steps older than the current ones (dropped, not importance-corrected). A dropped
  episode's later calls and finish get an :class:`EpisodeError` (409); nothing of it is ever returned by
  :meth:`play`, so nothing is trained on half an episode.
- **Context.** :meth:`context` retrieves memory for the episode (task + first observation, as the in-process
  runner does) and puts it first in the system text, the batch's context (a critique, for refinements) after it.
  The client never sees or sends it.
- **Locks.** ``lock`` guards hub state (every public method takes it itself). ``engine_lock`` is held by the
  server around each engine call and by the trainer around each optimizer step, so generation never reads
  weights in the middle of an update.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from critique_rl.agents.trajectory import Trajectory

EpisodeState = Literal["live", "finished", "dropped"]
ContextFn = Callable[[list[dict[str, Any]], list[str]], list[tuple[str, list[str]]]]


class EpisodeError(Exception):
    """An episode id that cannot take this call: ``status`` 404 (unknown) or 409 (finished, dropped, closed)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class HubClosed(RuntimeError):
    """The hub was closed while a batch was still being played (the server is shutting down)."""


@dataclass
class LiveEpisode:
    """An episode handed out and not yet finished. The server records its calls into ``trajectory`` (holding
    ``lock``), keeps the client-visible ``messages`` and the context token ``ids``, and refreshes ``last_seen``."""

    episode_id: str
    trajectory: Trajectory
    messages: list[dict[str, Any]]
    last_seen: float
    policy_version: int
    group_id: str = ""
    ids: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    greedy: bool = False
    state: EpisodeState = "live"
    reason: str | None = None
    context_ready: bool = False
    busy: bool = False
    """A call of this episode is being generated (the server answers a second concurrent call with 409)."""
    stopped: str | None = None
    """``"max_tokens"`` / ``"max_turns"`` when the server stopped the episode at a limit (as the runner does)."""
    client_system: str | None = None
    """The client's own system text, recorded at the first call (it comes before the hub's context)."""

    @property
    def task(self) -> dict[str, Any]:
        return self.trajectory.task


@dataclass
class _Slot:
    batch: _Batch
    index: int
    attempts: int = 0


@dataclass
class _Batch:
    tasks: list[dict[str, Any]]
    n: int
    contexts: list[str | None]
    greedy: bool
    label: str
    results: list[Trajectory | None]
    episode_ids: list[str | None]

    @property
    def done(self) -> bool:
        return all(r is not None for r in self.results)


class EpisodeHub:
    """Hands out tasks, tracks live episodes, returns finished ones to :meth:`play` (thread-safe).

    Args:
        idle_timeout: seconds without a call or finish after which a live episode is dropped (slot re-queued).
        max_staleness: episodes finished on weights more than this many optimizer steps older than the current
            ones are dropped and replayed (0: only episodes played entirely on the current weights train).
        context_fn: memory retrieval, ``(tasks, first_observations) -> [(text, record_ids)]`` (the runner's).
        clock: time source (seconds); tests pass a fake one.
    """

    def __init__(self, *, idle_timeout: float = 300.0, max_staleness: int = 0, context_fn: ContextFn | None = None,
                 clock: Callable[[], float] = time.monotonic, run_id: str | None = None) -> None:
        if idle_timeout <= 0:
            raise ValueError(f"idle_timeout = {idle_timeout}: use a number of seconds > 0")
        if max_staleness < 0:
            raise ValueError(f"max_staleness = {max_staleness}: use >= 0 optimizer steps")
        self.lock = threading.RLock()
        self.engine_lock = threading.Lock()
        self._cond = threading.Condition(self.lock)
        self.idle_timeout = float(idle_timeout)
        self.max_staleness = int(max_staleness)
        self.context_fn = context_fn
        self.clock = clock
        self.run_id = run_id or uuid.uuid4().hex[:8]
        self.policy_version = 0
        self.closed = False
        # engine side, set by the trainer side (ServerSource) once the policy exists
        self.engine: Any = None
        self.tokenizer: Any = None
        self.renderer: Any = None
        self.limits: Any = None
        self.temperature = 1.0
        self.top_p = 1.0
        self.model_name = "policy"
        self._queue: deque[_Slot] = deque()
        self._live: dict[str, tuple[LiveEpisode, _Slot]] = {}
        self._gone: dict[str, str] = {}  # finished / dropped episode id -> why it takes no more calls
        self._counter = 0
        self._batches = 0
        self.counts = {"handed_out": 0, "finished": 0, "dropped_timeout": 0, "dropped_stale": 0,
                       "dropped_closed": 0, "trained": 0}
        self.on_event: Callable[[dict[str, Any]], None] | None = None

    # ------------------------------------------------------------------------------------------------------
    # engine side
    # ------------------------------------------------------------------------------------------------------
    def sampling_params(self, greedy: bool = False) -> Any:
        """How recorded calls sample: the config's temperature/top_p, ``agent.max_turn_tokens`` new tokens."""
        from critique_rl.rollout.base import SamplingParams

        if self.limits is None:
            raise RuntimeError("the hub has no episode limits yet (the trainer side sets them at setup)")
        return SamplingParams(n=1, temperature=self.temperature, top_p=self.top_p,
                              max_new_tokens=self.limits.max_new_tokens, greedy=greedy)

    def bump_version(self) -> int:
        """The trainer finished an optimizer step: episodes started before are now one version older."""
        with self.lock:
            self.policy_version += 1
            return self.policy_version

    # ------------------------------------------------------------------------------------------------------
    # trainer side
    # ------------------------------------------------------------------------------------------------------
    def play(self, tasks: Sequence[dict[str, Any]], n: int, contexts: Sequence[str | None] | None = None, *,
             greedy: bool = False, label: str = "train", poll_s: float = 0.5,
             ids_out: list[str] | None = None) -> list[Trajectory]:
        """Hand out ``n`` episodes per task and block until all are finished; episodes ``i*n .. i*n+n-1`` are
        task ``i``'s (their ids appended to ``ids_out``). Raises :class:`HubClosed` when the hub is closed first."""
        if n < 1:
            raise ValueError(f"n = {n}: hand out at least one episode per task")
        if contexts is not None and len(contexts) != len(tasks):
            raise ValueError(f"contexts has {len(contexts)} entries for {len(tasks)} tasks")
        ctx = list(contexts) if contexts is not None else [None] * len(tasks)
        batch = _Batch(list(tasks), n, ctx, greedy, label, [None] * (len(tasks) * n), [None] * (len(tasks) * n))
        with self._cond:
            if self.closed:
                raise HubClosed("the episode hub is closed")
            self._batches += 1
            self._queue.extend(_Slot(batch, i) for i in range(len(batch.results)))
            self._cond.notify_all()
            while not batch.done:
                if self.closed:
                    raise HubClosed("the episode hub was closed while a batch was being played")
                self._reap()
                self._cond.wait(timeout=poll_s)
        if ids_out is not None:
            ids_out.extend(e for e in batch.episode_ids if e is not None)
        return [r for r in batch.results if r is not None]

    def close(self) -> None:
        """No more handouts: waiting :meth:`start` calls return None, :meth:`play` raises HubClosed, live
        episodes are dropped."""
        with self._cond:
            self.closed = True
            for eid in list(self._live):
                self._drop(eid, "the server is shutting down", "dropped_closed", requeue=False)
            self._queue.clear()
            self._cond.notify_all()

    def mark_trained(self, count: int) -> None:
        with self.lock:
            self.counts["trained"] += count

    # ------------------------------------------------------------------------------------------------------
    # client side (the HTTP server calls these)
    # ------------------------------------------------------------------------------------------------------
    def start(self, timeout: float | None = None) -> dict[str, Any] | None:
        """Hand out the next episode: ``{"episode_id", "task", "group_id", "policy_version"}``; None when
        nothing is to be handed out within ``timeout`` seconds (None: wait until there is) or the hub is
        closed."""
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        with self._cond:
            while True:
                if self.closed:
                    return None
                self._reap()
                if self._queue:
                    return self._hand_out(self._queue.popleft())
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(timeout=min(left, 1.0) if left is not None else 1.0)

    def live(self, episode_id: str) -> LiveEpisode:
        """The episode in flight; :class:`EpisodeError` 404 for an unknown id, 409 for one that takes no more
        calls (finished, dropped as idle or stale, hub closed)."""
        with self.lock:
            self._reap()
            got = self._live.get(episode_id)
            if got is not None:
                return got[0]
            self._raise_gone(episode_id)
            raise AssertionError  # unreachable

    def touch(self, episode_id: str) -> None:
        """Refresh the idle clock of a live episode (the server calls it per request)."""
        with self.lock:
            got = self._live.get(episode_id)
            if got is not None:
                got[0].last_seen = self.clock()

    def context(self, episode_id: str, first_observation: str | None = None) -> str | None:
        """The system text of the episode's first prompt: retrieved memory first, then the batch's context (a
        critique for a refinement). Computed once, at the first call (retrieval reads the task and
        ``first_observation``, as the in-process runner does at reset); later calls return the same text."""
        with self.lock:
            ep = self.live(episode_id)
            if not ep.context_ready:
                traj = ep.trajectory
                if self.context_fn is not None:
                    obs = first_observation if first_observation is not None else str(traj.task.get("prompt", ""))
                    (text, ids), = self.context_fn([traj.task], [obs])
                    traj.memory_context = text or None
                    traj.retrieved_ids = list(ids)
                    traj.context = "\n\n".join(x for x in (text, traj.context) if x) or None
                ep.context_ready = True
            return ep.trajectory.context

    def finish(self, episode_id: str, reward: float, success: bool | None = None,
               feedback: str | None = None) -> dict[str, Any]:
        """Close an episode with its return (``reward``), the env's verdict (``success``; None: reward > 0) and
        optional feedback text. ``accepted`` is False (with the reason) when the episode is dropped as stale
        (its slot is played again). Raises :class:`EpisodeError` for an unknown / already closed id."""
        reward = float(reward)
        if reward != reward or reward in (float("inf"), float("-inf")):
            raise EpisodeError(f"episode {episode_id}: reward {reward} is not a finite number", 400)
        with self._cond:
            ep = self.live(episode_id)
            _, slot = self._live[episode_id]
            lag = self.policy_version - ep.policy_version
            if lag > self.max_staleness:
                reason = (f"stale: started on policy version {ep.policy_version}, now {self.policy_version} "
                          f"(max_staleness {self.max_staleness})")
                self._drop(episode_id, reason, "dropped_stale", requeue=True)
                return {"episode_id": episode_id, "accepted": False, "reason": reason}
            with ep.lock:  # a call of this episode still recording finishes first
                if ep.busy:
                    raise EpisodeError(f"episode '{episode_id}': a call is still being generated; finish it after "
                                       "its reply", 409)
                _finalize(ep.trajectory, reward, success, feedback, ep.stopped)
                ep.state = "finished"
            del self._live[episode_id]
            self._gone[episode_id] = "finished"
            slot.batch.results[slot.index] = ep.trajectory
            slot.batch.episode_ids[slot.index] = episode_id
            self.counts["finished"] += 1
            self._emit({"event": "finished", "episode_id": episode_id, "label": slot.batch.label,
                        "reward": reward, "success": ep.trajectory.success, "turns": ep.trajectory.num_turns,
                        "policy_version": ep.policy_version})
            self._cond.notify_all()
            return {"episode_id": episode_id, "accepted": True, "reason": None}

    def in_flight(self) -> int:
        """Episodes handed out and not yet finished or dropped (the engine thread asks before each early
        dispatch; no reaping here: an idle episode not yet dropped still counts, so a batch waits at most its
        window for it)."""
        with self.lock:
            return len(self._live)

    def queued(self) -> int:
        """Slots waiting to be handed out."""
        with self.lock:
            return len(self._queue)

    def stats(self) -> dict[str, Any]:
        """Counts for ``/v1/episodes/stats``."""
        with self.lock:
            self._reap()
            return {**self.counts, "in_flight": len(self._live), "queued": len(self._queue),
                    "policy_version": self.policy_version, "closed": self.closed, "run_id": self.run_id}

    # ------------------------------------------------------------------------------------------------------
    # internals (called with the lock held)
    # ------------------------------------------------------------------------------------------------------
    def _hand_out(self, slot: _Slot) -> dict[str, Any]:
        b = slot.batch
        task_index = slot.index // b.n
        self._counter += 1
        eid = f"ep-{self.run_id}-{self._counter:06d}"
        group_id = f"{self.run_id}-b{self._batches}-g{task_index}"
        traj = Trajectory(task=b.tasks[task_index], context=b.contexts[task_index] or None)
        ep = LiveEpisode(episode_id=eid, trajectory=traj, messages=[], last_seen=self.clock(),
                         policy_version=self.policy_version, group_id=group_id, greedy=b.greedy,
                         context_ready=self.context_fn is None)
        slot.attempts += 1
        self._live[eid] = (ep, slot)
        self.counts["handed_out"] += 1
        self._emit({"event": "handed_out", "episode_id": eid, "group_id": group_id, "label": b.label,
                    "policy_version": self.policy_version})
        return {"episode_id": eid, "task": dict(b.tasks[task_index]), "group_id": group_id,
                "policy_version": self.policy_version}

    def _reap(self) -> None:
        now = self.clock()
        for eid, (ep, _) in list(self._live.items()):
            if not ep.busy and now - ep.last_seen > self.idle_timeout:  # a call waiting for the engine is not idle
                self._drop(eid, f"timed out: no call for more than {self.idle_timeout:g} s", "dropped_timeout",
                           requeue=True)

    def _drop(self, eid: str, reason: str, counter: str, *, requeue: bool) -> None:
        ep, slot = self._live.pop(eid)
        with ep.lock:  # a call recording now sees the drop (lock order: hub.lock, then ep.lock)
            ep.state, ep.reason = "dropped", reason
        self._gone[eid] = f"dropped ({reason})"
        self.counts[counter] += 1
        if requeue:
            self._queue.appendleft(slot)  # replayed before anything newer
        self._emit({"event": "dropped", "episode_id": eid, "reason": reason, "label": slot.batch.label})
        self._cond.notify_all()

    def _raise_gone(self, episode_id: str) -> None:
        why = self._gone.get(episode_id)
        if why is None:
            raise EpisodeError(f"unknown episode id '{episode_id}' (start one with next_task)", 404)
        raise EpisodeError(f"episode '{episode_id}' takes no more calls: {why}", 409)

    def _emit(self, event: dict[str, Any]) -> None:
        if self.on_event is not None:
            self.on_event(event)


def _finalize(traj: Trajectory, reward: float, success: bool | None, feedback: str | None,
              stopped: str | None = None) -> None:
    """The client's outcome on the recorded trajectory: the return on the last turn (the runner puts each
    step's reward on its turn; the client reports the sum), success, and the feedback in the last turn's info.
    An episode the server stopped at a limit keeps ``done=False`` and that ``stop_reason`` (as the runner's)."""
    for t in traj.turns:
        t.reward = 0.0
    if traj.turns:
        traj.turns[-1].reward = reward
        traj.turns[-1].info = {**traj.turns[-1].info, "success": success if success is not None else reward > 0}
        if feedback:
            traj.turns[-1].info["feedback"] = str(feedback)
    if stopped in ("max_tokens", "max_turns"):
        traj.done = False
        traj.stop_reason = stopped  # type: ignore[assignment]
    else:
        traj.done = True
        traj.stop_reason = "done"
    traj.success = bool(success) if success is not None else reward > 0
