"""Held-out evaluation: greedy accuracy, pass@k by sampling, mean completion length."""

from __future__ import annotations

from collections.abc import Callable
from math import comb
from typing import Any

from critique_rl.rollout.base import Generator, SamplingParams
from critique_rl.train.calibration import calibration_report


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021, arXiv:2107.03374): ``1 - C(n-c, k) / C(n, k)``."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def evaluate(
    generator: Generator,
    rows: list[dict[str, Any]],
    prompt_fn: Callable[[dict[str, Any]], str],
    verify: Callable[[str, str], bool],
    max_new_tokens: int,
    k: int = 1,
    temperature: float = 1.0,
    batch_size: int = 256,
    confidence_fn: Callable[[str], float | None] | None = None,
    bins: int = 10,
) -> dict[str, Any]:
    """``accuracy`` (greedy), ``mean_length`` (tokens, greedy) and, when ``k > 1``, ``pass@k`` from
    ``k`` samples per problem at ``temperature``.

    With ``confidence_fn`` (completion text -> stated confidence in [0, 1] or None), the greedy answers are
    also scored for calibration: every key of :func:`critique_rl.train.calibration.calibration_report`
    (``ece`` with ``bins`` bins, ``brier_score``, ``auroc``, ``mean_confidence``, ``unparsable_rate``, ...).
    """
    prompts = [prompt_fn(r) for r in rows]
    flags: list[bool] = []
    confidences: list[float | None] = []
    lengths = 0
    for s in range(0, len(rows), batch_size):
        outs = generator.generate(prompts[s : s + batch_size], SamplingParams(n=1, max_new_tokens=max_new_tokens, greedy=True))
        for row, (c,) in zip(rows[s : s + batch_size], outs, strict=True):
            flags.append(bool(verify(c.text, row["answer"])))
            lengths += len(c.token_ids)
            if confidence_fn is not None:
                confidences.append(confidence_fn(c.text))
    result: dict[str, Any] = {"accuracy": sum(flags) / len(rows), "mean_length": lengths / len(rows),
                              "n": float(len(rows))}
    if confidence_fn is not None:
        result.update(calibration_report(confidences, flags, bins))
    if k > 1:
        total = 0.0
        for s in range(0, len(rows), max(1, batch_size // k)):
            chunk = rows[s : s + max(1, batch_size // k)]
            outs = generator.generate([prompt_fn(r) for r in chunk],
                                      SamplingParams(n=k, temperature=temperature, max_new_tokens=max_new_tokens))
            for row, group in zip(chunk, outs, strict=True):
                c = sum(bool(verify(x.text, row["answer"])) for x in group)
                total += pass_at_k(k, c, k)
        result[f"pass@{k}"] = total / len(rows)
    return result
