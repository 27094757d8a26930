"""Calibration of verbalised confidence: expected calibration error (ECE), Brier score, AUROC (pure metrics;
the held-out evaluation helper is :func:`critique_rl.train.evaluate.evaluate_calibration`).

Used with tasks whose completions carry ``<confidence>q</confidence>`` (``addition_conf``; the ``brier``
reward of RLCR, arXiv:2507.16806, trains it).
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from typing import Any


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool | float], bins: int = 10) -> float:
    """Expected calibration error with ``bins`` equal-width bins over [0, 1] (Guo et al. 2017, arXiv:1706.04599)::

        ECE = sum_b (|B_b| / N) * | acc(B_b) - conf(B_b) |

    where ``B_b`` holds the samples whose confidence ``q`` falls in bin ``b = min(floor(q * bins), bins - 1)``
    (bins ``[0, 1/bins), [1/bins, 2/bins), ..., [(bins-1)/bins, 1]``: the last bin is closed, so ``q = 1``
    lands in it), ``acc(B_b)`` is the fraction correct in the bin and ``conf(B_b)`` the mean confidence in it.
    Empty bins contribute nothing. The result lies in [0, 1]; 0 is perfect calibration.

    Args:
        confidences: one confidence per sample, each in [0, 1] (callers map an unparsable confidence to 0).
        correct: one correctness flag (bool or 0/1) per sample.
        bins: number of equal-width bins (>= 1).

    Raises:
        ValueError: on length mismatch, no samples, ``bins < 1``, or a confidence outside [0, 1] / NaN.
    """
    if len(confidences) != len(correct):
        raise ValueError(f"confidences ({len(confidences)}) and correct ({len(correct)}) differ in length")
    if not confidences:
        raise ValueError("ECE of zero samples is undefined")
    if bins < 1:
        raise ValueError(f"bins must be >= 1; got {bins}")
    count = [0] * bins
    conf_sum = [0.0] * bins
    acc_sum = [0.0] * bins
    for q, c in zip(confidences, correct, strict=True):
        q = float(q)
        if not (math.isfinite(q) and 0.0 <= q <= 1.0):
            raise ValueError(f"confidence {q} is outside [0, 1]")
        b = min(int(math.floor(q * bins)), bins - 1)
        count[b] += 1
        conf_sum[b] += q
        acc_sum[b] += float(c)
    n = len(confidences)
    return sum(abs(acc_sum[b] - conf_sum[b]) / n for b in range(bins) if count[b])


def confidence_auroc(confidences: Sequence[float], correct: Sequence[bool | float]) -> float | None:
    """Discrimination of the confidences: AUROC of ``q`` for separating correct from wrong answers.

    ``AUROC = P(q_correct > q_wrong) + 0.5 P(q_correct = q_wrong)`` over all (correct, wrong) pairs (the
    Mann-Whitney U statistic divided by ``n_correct * n_wrong``). 0.5 is chance, 1.0 perfect ranking; a
    constant confidence scores 0.5 however well its level matches the accuracy, which ECE alone cannot
    see. ``None`` when every answer is correct or every answer is wrong.
    """
    pos = sorted(float(q) for q, c in zip(confidences, correct, strict=True) if c)
    neg = sorted(float(q) for q, c in zip(confidences, correct, strict=True) if not c)
    if not pos or not neg:
        return None
    wins = sum(bisect_left(neg, q) + 0.5 * (bisect_right(neg, q) - bisect_left(neg, q)) for q in pos)
    return wins / (len(pos) * len(neg))


def calibration_report(confidences: Sequence[float | None], correct: Sequence[bool], bins: int = 10) -> dict[str, Any]:
    """Scores of verbalised confidence against correctness (an unparsable confidence, i.e. None, counts as 0):

    - ``accuracy``; ``ece`` (:func:`expected_calibration_error`, ``bins`` bins);
    - ``brier_score`` = mean ``(q - 1[correct])^2`` (lower is better; RLCR's calibration term);
    - ``auroc`` (:func:`confidence_auroc`; None when all answers are correct or all wrong);
    - ``unparsable_rate``, ``mean_confidence``, ``distinct_confidences`` (how many different values were
      stated: 1 means a constant confidence) and ``n``.
    """
    qs = [0.0 if q is None else float(q) for q in confidences]
    flags = [bool(c) for c in correct]
    n = len(qs)
    return {
        "accuracy": sum(flags) / n,
        "ece": expected_calibration_error(qs, flags, bins),
        "brier_score": sum((q - float(c)) ** 2 for q, c in zip(qs, flags, strict=True)) / n,
        "auroc": confidence_auroc(qs, flags),
        "unparsable_rate": sum(q is None for q in confidences) / n,
        "mean_confidence": sum(qs) / n,
        "distinct_confidences": len(set(qs)),
        "n": float(n),
    }
