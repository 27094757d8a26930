"""Critic counters (requests, errors, tokens, latencies) and verdict accuracy against the verifier."""

from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from critique_rl.critics.base import Critique



class CriticStats:
    """Thread-safe counters behind :meth:`BaseCritic.metrics` (cumulative until :meth:`reset`)."""

    COUNTERS = (
        "requests",
        "errors",
        "fallbacks",
        "cache_hits",
        "verdict_disagreements",
        "unparsable_verdicts",
        "regenerations",
        "retries",
        "prompt_tokens",
        "completion_tokens",
        "verdicts_checked",
        "verdicts_agreed",
        "wrong_flagged",
        "right_flagged",
        "wrong_missed",
    )
    """``verdicts_*`` / ``*_flagged`` / ``wrong_missed``: first-try cot verdicts against the verifier's (see
    :func:`verdict_scores`): checked, agreed, wrong answers called incorrect (true positives), right answers
    called incorrect (false positives), wrong answers called correct or left without a verdict (misses)."""

    def __init__(self, max_latencies: int = 10_000) -> None:
        self._lock = threading.Lock()
        self._max_latencies = max_latencies
        self.reset()

    def reset(self) -> None:
        """Zero every counter and forget latencies."""
        with self._lock:
            self.counts: dict[str, int] = dict.fromkeys(self.COUNTERS, 0)
            self.latencies: deque[float] = deque(maxlen=self._max_latencies)

    def add(self, name: str, value: int = 1) -> None:
        """Increase counter ``name`` by ``value``."""
        with self._lock:
            self.counts[name] += value

    def record(self, critique: Critique) -> None:
        """Count one finished critique (its latency and whether it fell back)."""
        with self._lock:
            self.counts["requests"] += 1
            self.latencies.append(critique.latency_s)
            if critique.fallback:
                self.counts["fallbacks"] += 1

    def as_dict(self) -> dict[str, float]:
        """``critic/<name>`` -> value, plus latency p50/p95 in seconds."""
        with self._lock:
            out = {f"critic/{k}": float(v) for k, v in self.counts.items()}
            lat = sorted(self.latencies)
        out["critic/latency_p50"] = _percentile(lat, 0.50)
        out["critic/latency_p95"] = _percentile(lat, 0.95)
        return out


VERDICT_COUNTERS = ("verdicts_checked", "verdicts_agreed", "wrong_flagged", "right_flagged", "wrong_missed")


def verdict_scores(checked: int, agreed: int, wrong_flagged: int, right_flagged: int,
                   wrong_missed: int) -> dict[str, float | None]:
    """Verdict accuracy of a critic against the verifier, wrong answers as the positive class:

    accuracy = agreed / checked; precision = TP / (TP + FP); recall = TP / (TP + FN), with TP = wrong answers
    the critic called incorrect, FP = right answers it called incorrect, FN = wrong answers it called correct
    or gave no verdict. None where the denominator is 0 (e.g. precision when only wrong answers are critiqued
    and none was flagged)."""
    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    return {"accuracy": ratio(agreed, checked), "precision_wrong": ratio(wrong_flagged, wrong_flagged + right_flagged),
            "recall_wrong": ratio(wrong_flagged, wrong_flagged + wrong_missed)}


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo))


