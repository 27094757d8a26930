"""Deciding apart from learning: a post-hoc abstention rule on verbalised confidence.

Training keeps a symmetric objective (correctness, a proper scoring rule such as Brier); the decision whether
to answer is made afterwards, on a validation split, for a user's utility:

    U(answer, right) = reward_right,   U(answer, wrong) = -penalty_wrong,   U(abstain) = abstain_value

The rule answers when the (optionally recalibrated) confidence ``q`` is at least a threshold ``t``:
:func:`fit_threshold` picks the ``t`` that maximises the mean utility on the validation split. With a
calibrated ``q`` the Bayes rule is ``t* = (abstain_value + penalty_wrong) / (reward_right + penalty_wrong)``
(:func:`bayes_threshold`), reported alongside.

Recalibration (fitted on the same split, before the threshold): ``temperature`` scaling of the confidence's
log-odds (``q' = sigmoid(logit(q) / T)``, Guo et al. 2017, arXiv:1706.04599; ``T`` by minimum log-loss) or
``isotonic`` regression (pool-adjacent-violators, Zadrozny & Elkan 2002), a monotone step map. An unparsable
confidence counts as 0 (never answered unless the threshold is 0).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from critique_rl.primitives import Utility, bayes_threshold  # noqa: F401 (re-exported)

RULE_FILE = "decision_rule.json"
"""File name of the rule, saved beside the model (``final/decision_rule.json``)."""
EPS = 1e-6


def selective_scores(conf: Sequence[float], correct: Sequence[bool], threshold: float | None,
                     u: Utility) -> dict[str, float | None]:
    """Mean utility, coverage (share answered) and accuracy on the answered items of the rule "answer iff
    ``q >= threshold``" (``threshold`` None = never answer)."""
    n = len(conf)
    if n == 0:
        raise ValueError("no samples")
    answered = [threshold is not None and q >= threshold for q in conf]
    k = sum(answered)
    right = sum(1 for a, c in zip(answered, correct, strict=True) if a and c)
    total = right * u.reward_right - (k - right) * u.penalty_wrong + (n - k) * u.abstain_value
    return {"utility": total / n, "coverage": k / n, "selective_accuracy": right / k if k else None}


def fit_threshold(conf: Sequence[float], correct: Sequence[bool], u: Utility) -> tuple[float | None, dict[str, Any]]:
    """The threshold maximising :func:`selective_scores`' mean utility over every distinct confidence (answer
    the items at or above it) and "never answer" (None). Ties go to the higher coverage (lower threshold)."""
    candidates: list[float | None] = sorted(set(float(q) for q in conf))
    candidates.append(None)
    best: tuple[float | None, dict[str, Any]] | None = None
    for t in candidates:
        s = selective_scores(conf, correct, t, u)
        if best is None or s["utility"] > best[1]["utility"] + 1e-12:
            best = (t, s)
    assert best is not None
    return best


# ---------------------------------------------------------------------------------------------------------
# recalibration
# ---------------------------------------------------------------------------------------------------------
def _logit(q: float) -> float:
    q = min(1 - EPS, max(EPS, q))
    return math.log(q / (1 - q))


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def temperature_scale(q: float, t: float) -> float:
    """``sigmoid(logit(q) / t)`` (q clipped to [1e-6, 1 - 1e-6] first)."""
    return _sigmoid(_logit(q) / t)


def log_loss(conf: Sequence[float], correct: Sequence[bool]) -> float:
    total = 0.0
    for q, c in zip(conf, correct, strict=True):
        q = min(1 - EPS, max(EPS, q))
        total -= math.log(q if c else 1 - q)
    return total / len(conf)


def fit_temperature(conf: Sequence[float], correct: Sequence[bool], lo: float = 0.05, hi: float = 20.0) -> float:
    """The ``T`` minimising the log-loss of :func:`temperature_scale` (golden-section search on ``log T``; the
    loss is unimodal in ``log T`` for a fixed set of logits)."""
    a, b = math.log(lo), math.log(hi)
    g = (math.sqrt(5) - 1) / 2

    def f(x: float) -> float:
        t = math.exp(x)
        return log_loss([temperature_scale(q, t) for q in conf], correct)

    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(80):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return math.exp((a + b) / 2)


def fit_isotonic(conf: Sequence[float], correct: Sequence[bool]) -> tuple[list[float], list[float]]:
    """Pool-adjacent-violators: a non-decreasing step map from confidence to accuracy. Returns the knots
    ``(xs, ys)``: each pooled block contributes its lowest and highest confidence with the block's accuracy;
    :func:`isotonic_apply` interpolates linearly between knots and clamps outside them."""
    pairs = sorted(zip((float(q) for q in conf), (float(c) for c in correct), strict=True))
    # merge equal confidences first: one block per distinct value
    blocks: list[list[float]] = []  # [sum_y, count, x_lo, x_hi]
    for x, y in pairs:
        if blocks and blocks[-1][3] == x:
            blocks[-1][0] += y
            blocks[-1][1] += 1
        else:
            blocks.append([y, 1.0, x, x])
    stack: list[list[float]] = []
    for b in blocks:
        stack.append(list(b))
        while len(stack) > 1 and stack[-2][0] / stack[-2][1] >= stack[-1][0] / stack[-1][1]:
            top = stack.pop()
            stack[-1][0] += top[0]
            stack[-1][1] += top[1]
            stack[-1][3] = top[3]
    xs: list[float] = []
    ys: list[float] = []
    for s, n, x_lo, x_hi in stack:
        for x in ((x_lo,) if x_lo == x_hi else (x_lo, x_hi)):
            xs.append(x)
            ys.append(s / n)
    return xs, ys


def isotonic_apply(q: float, xs: Sequence[float], ys: Sequence[float]) -> float:
    """Linear interpolation through the knots, clamped to the end values outside them."""
    if q <= xs[0]:
        return ys[0]
    if q >= xs[-1]:
        return ys[-1]
    for i in range(1, len(xs)):
        if q <= xs[i]:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return y0 if x1 == x0 else y0 + (y1 - y0) * (q - x0) / (x1 - x0)
    return ys[-1]


# ---------------------------------------------------------------------------------------------------------
# the rule
# ---------------------------------------------------------------------------------------------------------
Recalibration = Literal["none", "temperature", "isotonic"]


@dataclass
class DecisionRule:
    """Answer iff ``recalibrate(q) >= threshold`` (threshold None = never answer)."""

    threshold: float | None
    utility: Utility
    recalibration: Recalibration = "none"
    temperature: float | None = None
    iso_x: list[float] = field(default_factory=list)
    iso_y: list[float] = field(default_factory=list)
    fit: dict[str, Any] = field(default_factory=dict)
    """Validation-split statistics of the fit (n, utility, coverage, ...), for the record."""

    def recalibrate(self, q: float | None) -> float:
        q = 0.0 if q is None else float(q)
        if self.recalibration == "temperature":
            return temperature_scale(q, float(self.temperature or 1.0))
        if self.recalibration == "isotonic":
            return isotonic_apply(q, self.iso_x, self.iso_y)
        return q

    def answers(self, q: float | None) -> bool:
        return self.threshold is not None and self.recalibrate(q) >= self.threshold

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = "abstention_threshold"
        return d

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.write_text(json.dumps(self.to_dict(), indent=2))
        return p

    @classmethod
    def load(cls, path: str | Path) -> DecisionRule:
        d = json.loads(Path(path).read_text())
        d.pop("kind", None)
        d["utility"] = Utility(**d["utility"])
        return cls(**d)


def fit_rule(conf: Sequence[float | None], correct: Sequence[bool], u: Utility,
             recalibration: Recalibration = "none") -> DecisionRule:
    """Fit the recalibration map (if any) and then the utility-maximising threshold on a validation split."""
    raw = [0.0 if q is None else float(q) for q in conf]
    flags = [bool(c) for c in correct]
    rule = DecisionRule(threshold=None, utility=u, recalibration=recalibration)
    if recalibration == "temperature":
        rule.temperature = fit_temperature(raw, flags)
    elif recalibration == "isotonic":
        rule.iso_x, rule.iso_y = fit_isotonic(raw, flags)
    cal = [rule.recalibrate(q) for q in raw]
    rule.threshold, scores = fit_threshold(cal, flags, u)
    answer_all = selective_scores(cal, flags, min(cal), u)
    rule.fit = {"n": len(raw), **scores, "utility_answer_all": answer_all["utility"],
                "utility_abstain_all": u.abstain_value, "bayes_threshold": bayes_threshold(u),
                "accuracy": sum(flags) / len(flags), "log_loss_raw": log_loss(raw, flags),
                "log_loss_recalibrated": log_loss(cal, flags)}
    return rule


def plot_reliability(raw: Sequence[float | None], correct: Sequence[bool], rule: DecisionRule, path: str | Path,
                     bins: int = 10) -> Path:
    """Reliability diagram (accuracy against mean confidence per equal-width bin), raw and recalibrated, with
    the threshold as a vertical line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from critique_rl.train.calibration import expected_calibration_error

    qs = [0.0 if q is None else float(q) for q in raw]
    series = [("raw", qs)]
    if rule.recalibration != "none":
        series.append((rule.recalibration, [rule.recalibrate(q) for q in qs]))
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    for name, values in series:
        pts = []
        for b in range(bins):
            idx = [i for i, q in enumerate(values) if min(int(q * bins), bins - 1) == b]
            if idx:
                pts.append((sum(values[i] for i in idx) / len(idx), sum(correct[i] for i in idx) / len(idx)))
        ece = expected_calibration_error(values, list(correct), bins)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{name} (ECE {ece:.3f})")
    if rule.threshold is not None:
        ax.axvline(rule.threshold, color="red", linestyle="--", label=f"threshold {rule.threshold:.3f}")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"reliability (n={len(qs)})")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
