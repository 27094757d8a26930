"""A critic with injected errors: what a critic's mistakes cost (``critic.backend: noisy``).

:class:`NoisyCritic` wraps another critic (``critic.error_inner``: ``rule`` by default, i.e. the ground-truth
critic) and, for a share ``error_rate`` of the critiques it hands out, replaces the inner critique by a wrong one:

- ``error_kind: verdict`` -- the verdict is flipped: a wrong answer is called correct (``Your answer 84 is
  correct.``), a right one incorrect (``Your answer 85 is incorrect. Re-check your work and try again.``).
- ``error_kind: hint`` -- a critique of a wrong answer keeps its (right) verdict but names a wrong fix: ``Your
  answer 84 is incorrect. The correct answer is 95.`` (a number answer moved by 1, 2, 10 or 11, never the
  reference nor the response's own answer; else another request's reference from the same batch; a task with
  ``Task.wrong_reference``, e.g. ``constraints``, gives its own misleading reference). Critiques of right answers
  name no fix and are left alone.

``error_check`` is the verifier check every model critic has (:class:`~critique_rl.critics.base.BaseCritic`):
``true``, a critique whose verdict contradicts the verifier is drawn again (up to ``max_regenerations`` times,
each draw wrong with probability ``error_rate`` again), then replaced by the fallback rule critique; ``false``,
the critic's verdict is taken as it is. A misleading hint carries a right verdict, so the check cannot catch it.

Draws are seeded (``error_seed``; one stream per critic), so two runs with the same seed and the same requests
inject the same errors. Counted in :meth:`NoisyCritic.metrics`: ``critic/errors_injected`` (draws made wrong) and
``critic/errors_delivered`` (wrong critiques handed to the trainer, after the check), cumulative, and the same
since the previous read as ``critique/errors_injected`` / ``critique/errors_delivered`` (per step in a run).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

from critique_rl.critics.base import BaseCritic, Critique, CritiqueRequest, render_rule, response_answer

ERROR_KINDS: tuple[str, ...] = ("verdict", "hint")


class NoisyCritic(BaseCritic):
    """``inner``'s critiques with a share ``error_rate`` of them made wrong (see the module docstring).

    Args:
        inner: any critic (its critiques are the error-free ones).
        error_rate: share of draws made wrong, in [0, 1].
        error_kind: ``verdict`` (flipped verdicts) or ``hint`` (right verdict, wrong fix named).
        wrong_reference: the task's misleading reference for hint errors (``Task.wrong_reference``; the trainer
            sets the run's task's); None moves a number answer (else takes another request's reference).
        check: the verifier check (regenerate, then fall back, when the verdict contradicts the verifier).
        max_regenerations: draws after the first when the check rejects one.
        seed: seed of the error stream.
    """

    def __init__(self, inner: Any, *, error_rate: float, error_kind: str = "verdict", check: bool = True,
                 max_regenerations: int = 2, seed: int = 0, fallback_kind: str = "auto",
                 template_dir: str | None = None,
                 wrong_reference: Callable[[str, str | None, random.Random], str | None] | None = None) -> None:
        if not 0.0 <= float(error_rate) <= 1.0:
            raise ValueError(f"critic error_rate must be in [0, 1], got {error_rate!r}")
        if error_kind not in ERROR_KINDS:
            raise ValueError(f"critic error_kind must be one of {ERROR_KINDS}, got {error_kind!r}")
        kind = inner.kind if inner.kind in ("indicative", "ground_truth", "cot") else "cot"
        super().__init__(kind, fallback_kind=fallback_kind, max_regenerations=max_regenerations,
                         template_dir=template_dir, reference=getattr(inner, "reference", "visible"))
        self.inner = inner
        self.error_rate = float(error_rate)
        self.error_kind = error_kind
        self.check = bool(check)
        self.wrong_reference = wrong_reference
        """The task's misleading reference (``Task.wrong_reference``) for hint errors; None: move a number."""
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.injected = 0
        self.delivered = 0
        self._window = (0, 0)

    def __repr__(self) -> str:
        return (f"NoisyCritic({self.inner!r}, error_rate={self.error_rate}, error_kind={self.error_kind!r}, "
                f"check={self.check})")

    # -- public API ------------------------------------------------------------------------------------
    async def acritique(self, requests: list[CritiqueRequest]) -> list[Critique]:
        requests = list(requests)
        base = await self.inner.acritique(requests)
        out = []
        for i, (req, good) in enumerate(zip(requests, base, strict=True)):
            out.append(self._deliver(req, good, requests, i))
        for c in out:
            self.stats.record(c)
        return out

    def metrics(self, reset: bool = False) -> dict[str, float]:
        """The base metrics (verdict accuracy of the first draws against the verifier included), the inner
        critic's tokens, and the error counters (``critic/errors_*`` cumulative, ``critique/errors_*`` since the
        previous read)."""
        out = super().metrics(reset=False)
        inner = self.inner.metrics()
        for key in ("critic/prompt_tokens", "critic/completion_tokens", "critic/cache_hits", "critic/errors"):
            out[key] = out.get(key, 0.0) + float(inner.get(key, 0.0) or 0.0)
        out["critic/errors_injected"] = float(self.injected)
        out["critic/errors_delivered"] = float(self.delivered)
        out["critique/errors_injected"] = float(self.injected - self._window[0])  # since the previous read
        out["critique/errors_delivered"] = float(self.delivered - self._window[1])
        self._window = (self.injected, self.delivered)
        if reset:
            super().metrics(reset=True)
            self.injected = self.delivered = 0
            self._window = (0, 0)
        return out

    async def aclose(self) -> None:
        await self.inner.aclose()

    # -- internals -------------------------------------------------------------------------------------
    def _deliver(self, req: CritiqueRequest, good: Critique, batch: list[CritiqueRequest], index: int) -> Critique:
        t0 = time.perf_counter()
        for attempt in range(self.max_regenerations + 1):
            if attempt:
                self.stats.add("regenerations")
            wrong = self._draw_error()
            crit = self._corrupt(req, good, batch, index) if wrong else good
            wrong = crit is not good  # a hint error on a right answer (no fix to name) is no error
            self.injected += wrong
            if attempt == 0 and req.verdict is not None and crit.verdict is not None:
                self._count_verdict(crit.verdict, req.verdict)
            contradicts = req.verdict is not None and crit.verdict is not None and crit.verdict != req.verdict
            if contradicts:
                self.stats.add("verdict_disagreements")
            if not (self.check and contradicts):
                self.delivered += wrong
                if attempt:
                    crit = Critique(**{**crit.__dict__, "regenerations": attempt})
                return crit
        return self.fallback(req, f"verdict contradicts the verifier after {self.max_regenerations} regenerations",
                             latency_s=time.perf_counter() - t0, regenerations=self.max_regenerations)

    def _draw_error(self) -> bool:
        with self._lock:
            return self.error_rate > 0 and self._rng.random() < self.error_rate

    def _corrupt(self, req: CritiqueRequest, good: Critique, batch: list[CritiqueRequest], index: int) -> Critique:
        verdict = good.verdict if good.verdict is not None else req.verdict
        if verdict is None:
            return good  # nothing known to flip or fix
        if self.error_kind == "verdict":
            flipped = CritiqueRequest(req.question, req.response, req.reference, not verdict, dict(req.metadata))
            text = render_rule("indicative", flipped, self.template_dir)
            return Critique(text=text, verdict=not verdict, kind=good.kind, latency_s=good.latency_s,
                            prompt_tokens=good.prompt_tokens, completion_tokens=good.completion_tokens)
        if verdict:
            return good  # a right answer gets no fix to mislead with
        fix = self._wrong_fix(req, batch, index)
        if fix is None:
            return good
        misled = CritiqueRequest(req.question, req.response, fix, False, dict(req.metadata))
        text = render_rule("ground_truth", misled, self.template_dir)
        return Critique(text=text, verdict=False, kind=good.kind, latency_s=good.latency_s,
                        prompt_tokens=good.prompt_tokens, completion_tokens=good.completion_tokens)

    def _wrong_fix(self, req: CritiqueRequest, batch: list[CritiqueRequest], index: int) -> str | None:
        """A wrong answer to name as the fix: neither the reference nor the response's own answer."""
        avoid = {str(req.reference).strip(), response_answer(req).strip()}
        ref = str(req.reference or "").strip()
        with self._lock:
            if self.wrong_reference is not None and ref:
                fix = self.wrong_reference(ref, response_answer(req), self._rng)
                return None if fix is None or fix.strip() in avoid else fix
            if ref.lstrip("-").isdigit():
                deltas = [-11, -10, -2, -1, 1, 2, 10, 11]
                self._rng.shuffle(deltas)
                for d in deltas:
                    fix = str(int(ref) + d)
                    if fix not in avoid and (not fix.startswith("-") or ref.startswith("-")):
                        return fix
            others = [str(r.reference).strip() for j, r in enumerate(batch)
                      if j != index and r.reference not in (None, "") and str(r.reference).strip() not in avoid]
            return self._rng.choice(others) if others else None
