"""Built-in reward functions: ``format``, ``overlong`` (DAPO), ``brier`` (RLCR), ``selective_utility`` and
``math`` (math-verify, :mod:`critique_rl.rewards.math_verify`, imported at the end of this module).

Each is registered as a factory ``(task, **kwargs) -> RewardFunc``; set the keyword arguments in the config::

    reward_funcs: [correctness, format, overlong, brier]
    reward_kwargs:
      format: {pattern: '\\s*-?\\d+\\s*'}          # regex, must match the whole completion
      overlong: {max_length: 16, cache_length: 4}  # tokens
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from critique_rl.errors import UserError
from critique_rl.primitives import completion_text
from critique_rl.rewards.base import RewardFunc, register_reward
from critique_rl.tasks import Task
from critique_rl.tasks.confidence import CONFIDENCE_FORMAT

DEFAULT_FORMAT_PATTERNS: dict[str, str] = {
    "addition": r"\s*-?\d+\s*",
    "reverse": r"\s*[a-z]+\s*",
    "addition_conf": CONFIDENCE_FORMAT,
}
"""Default ``format`` regex per built-in task (``re.fullmatch``, DOTALL). A task object may instead carry a
``format_pattern`` attribute; tasks with neither fall back to "the task can extract an answer"."""


def resolve_format_pattern(task: Task, pattern: str | None) -> re.Pattern[str] | None:
    """The compiled format regex: explicit ``pattern`` > ``task.format_pattern`` > the built-in default."""
    src = pattern or getattr(task, "format_pattern", None) or DEFAULT_FORMAT_PATTERNS.get(task.name)
    if src is None:
        return None
    try:
        return re.compile(src, re.DOTALL)
    except re.error as exc:
        raise UserError(f"config field 'reward_kwargs' format pattern {src!r} is not a valid regex ({exc})") from None


def format_ok(task: Task, regex: re.Pattern[str] | None, completion: str) -> bool:
    """True iff ``regex`` matches the whole completion (or, with no regex, ``task.extract`` finds an answer)."""
    if regex is None:
        return task.extract(completion) is not None
    return regex.fullmatch(completion) is not None


def format_flags(task: Task, pattern: str | None) -> Callable[[list[Any], dict[str, Any]], list[bool]]:
    """``(completions, columns) -> [format ok]``, each completion judged by its row's task (a mixture's part
    named by the ``task`` column), with the regex :func:`resolve_format_pattern` gives that task."""
    regexes = {t.name: resolve_format_pattern(t, pattern) for t in (task.parts.values() if task.parts else [task])}

    def flags(completions: list[Any], columns: dict[str, Any]) -> list[bool]:
        judges = task.for_rows(len(completions), columns.get("task"))
        return [format_ok(t, regexes[t.name], completion_text(c)) for t, c in zip(judges, completions, strict=True)]

    return flags


@register_reward("format")
def format_factory(task: Task, pattern: str | None = None) -> RewardFunc:
    """``format``: 1.0 if the completion has the task's expected format, else 0.0.

    The format is a regular expression that must match the *whole* completion (``re.fullmatch``, DOTALL).
    Set it with ``reward_kwargs: {format: {pattern: '<regex>'}}``; otherwise the task's ``format_pattern``
    attribute, then :data:`DEFAULT_FORMAT_PATTERNS` (e.g. ``addition``: an integer, ``addition_conf``: an
    integer then ``<confidence>q</confidence>``), then "``task.extract`` parses an answer" is used.
    """
    flags = format_flags(task, pattern)

    def format(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float | None]:
        return [1.0 if ok else 0.0 for ok in flags(completions, columns)]

    return format


def token_lengths(completions: list[Any], lengths: list[int] | None) -> list[int]:
    """Token lengths from a ``completion_lengths`` column when given, else whitespace-token counts."""
    if lengths is None:
        return [len(completion_text(c).split()) for c in completions]
    if len(lengths) != len(completions):
        raise UserError(f"column 'completion_lengths' has {len(lengths)} values for {len(completions)} completions")
    return [int(x) for x in lengths]


def overlong_penalty(length: int, max_length: int, cache_length: int) -> float:
    """DAPO soft overlong punishment (arXiv:2503.14476, eq. 13), with ``L_max``, ``L_cache``::

        R(L) = 0                                  if L <= L_max - L_cache
             = ((L_max - L_cache) - L) / L_cache  if L_max - L_cache < L <= L_max
             = -1                                 if L > L_max
    """
    start = max_length - cache_length
    if length <= start:
        return 0.0
    if length <= max_length:
        return (start - length) / cache_length
    return -1.0


@register_reward("overlong")
def overlong_factory(task: Task, max_length: int | None = None, cache_length: int | None = None) -> RewardFunc:
    """``overlong``: DAPO soft overlong penalty (arXiv:2503.14476), see :func:`overlong_penalty`.

    Lengths are tokens from the ``completion_lengths`` column/kwarg (the rollout's generated-token counts)
    when present, else whitespace-separated tokens. Defaults: ``max_length = task.max_new_tokens`` and
    ``cache_length = max(1, round(0.2 * max_length))`` (DAPO: 4096 of 20480); ``cache_length = 0`` is a hard
    cut-off (0 up to ``max_length``, -1 beyond).
    """
    l_max = int(task.max_new_tokens if max_length is None else max_length)
    l_cache = max(1, round(0.2 * l_max)) if cache_length is None else int(cache_length)
    if l_max < 1 or not 0 <= l_cache <= l_max:
        raise UserError(
            f"config field 'reward_kwargs' overlong: need max_length >= 1 and 0 <= cache_length <= max_length; "
            f"got max_length={l_max}, cache_length={l_cache}"
        )

    def overlong(
        prompts: list[Any], completions: list[Any], completion_lengths: list[int] | None = None, **_: Any
    ) -> list[float | None]:
        lengths = token_lengths(completions, completion_lengths)
        if l_cache == 0:
            return [0.0 if n <= l_max else -1.0 for n in lengths]
        return [overlong_penalty(n, l_max, l_cache) for n in lengths]

    return overlong


_CONF_TAG = re.compile(r"<confidence>(.*?)</confidence>", re.DOTALL | re.IGNORECASE)
_CONF_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")


def parse_confidence(completion: str) -> float | None:
    """The verbalised confidence ``q`` of ``... <confidence>q</confidence>``, or None.

    None (a format failure) unless there is exactly one tag whose content (whitespace stripped) is a plain
    decimal number in ``[0, 1]`` (``0.8``, ``.8``, ``1``, ``1.0``); ``80%``, ``high``, ``nan``, ``1.2``,
    two tags, or an unclosed tag all give None.
    """
    found = _CONF_TAG.findall(completion)
    if len(found) != 1:
        return None
    text = found[0].strip()
    if not _CONF_NUMBER.fullmatch(text):
        return None
    q = float(text)
    return q if math.isfinite(q) and 0.0 <= q <= 1.0 else None


def brier_reward(correct: bool, q: float | None, format_penalty: float = -1.0) -> float:
    """RLCR (arXiv:2507.16806): ``R = 1[correct] - (q - 1[correct])^2`` in ``[-1, 1]``;
    ``format_penalty`` (default -1, the worst attainable score) when ``q`` is None."""
    if q is None:
        return float(format_penalty)
    c = 1.0 if correct else 0.0
    return c - (q - c) ** 2


@register_reward("brier")
def brier_factory(task: Task, format_penalty: float = -1.0) -> RewardFunc:
    """``brier``: RLCR correctness + Brier calibration reward (arXiv:2507.16806).

    ``R = 1[correct] - (q - 1[correct])^2`` with ``q`` from :func:`parse_confidence` and correctness from the
    task verifier on the reference ``answer`` column (the tag is ignored by the verifier). A missing,
    unparsable, duplicated or out-of-range confidence is a format failure: ``R = format_penalty`` (default
    -1.0, equal to the worst well-formed score: confidently wrong). None where ``answer`` is None.
    """

    def brier(prompts: list[Any], completions: list[Any], answer: list[str | None], **columns: Any) -> list[float | None]:
        out: list[float | None] = []
        judges = task.for_rows(len(completions), columns.get("task"))
        for t, c, a in zip(judges, completions, answer, strict=True):
            if a is None:
                out.append(None)
                continue
            text = completion_text(c)
            out.append(brier_reward(t.verify(text, a), parse_confidence(text), format_penalty))
        return out

    return brier


def selective_utility_reward(correct: bool, q: float | None, reward_right: float, penalty_wrong: float,
                             abstain_value: float, threshold: float, format_penalty: float) -> float:
    """The user's utility of one answer under the rule "answer iff ``q >= threshold``":

    ``R = reward_right`` (answered, right), ``-penalty_wrong`` (answered, wrong), ``abstain_value``
    (``q < threshold``), ``format_penalty`` (no parsable confidence). The asymmetric, decision-in-the-reward
    alternative to training on a proper scoring rule and deciding afterwards (:mod:`critique_rl.train.decision`).
    """
    if q is None:
        return format_penalty
    if q < threshold:
        return abstain_value
    return reward_right if correct else -penalty_wrong


@register_reward("selective_utility")
def selective_utility_factory(task: Task, reward_right: float = 1.0, penalty_wrong: float = 1.0,
                              abstain_value: float = 0.0, threshold: float | None = None,
                              format_penalty: float | None = None) -> RewardFunc:
    """``selective_utility``: the utility of answering or abstaining, learned in the reward (asymmetric when
    ``penalty_wrong != reward_right``). The policy abstains by stating a confidence ``q`` (``<confidence>q
    </confidence>``, as for ``brier``) below ``threshold``, which defaults to the Bayes threshold
    ``(abstain_value + penalty_wrong) / (reward_right + penalty_wrong)``. A missing confidence scores
    ``format_penalty`` (default ``-penalty_wrong``: as bad as a wrong answer). Correctness is the task verifier
    on the ``answer`` column; None where ``answer`` is None. Compare with training on ``brier`` and fitting the
    threshold afterwards (``critique-rl calibrate``): benchmarks/decide_vs_learn.py.
    """
    from critique_rl.primitives import Utility, bayes_threshold

    try:
        u = Utility(float(reward_right), float(penalty_wrong), float(abstain_value))
    except ValueError as exc:
        raise UserError(f"config field 'reward_kwargs' for selective_utility: {exc}") from None
    t = bayes_threshold(u) if threshold is None else float(threshold)
    if not 0.0 <= t <= 1.0:
        raise UserError(f"config field 'reward_kwargs' for selective_utility: threshold {t} must be in [0, 1]")
    fmt = -u.penalty_wrong if format_penalty is None else float(format_penalty)

    def selective_utility(prompts: list[Any], completions: list[Any], answer: list[str | None],
                          **columns: Any) -> list[float | None]:
        judges = task.for_rows(len(completions), columns.get("task"))
        out: list[float | None] = []
        for j, c, a in zip(judges, completions, answer, strict=True):
            text = completion_text(c)
            out.append(None if a is None else selective_utility_reward(
                j.verify(text, a), parse_confidence(text), u.reward_right, u.penalty_wrong, u.abstain_value, t, fmt))
        return out

    return selective_utility


from critique_rl.rewards import math_verify as _math_verify  # noqa: E402,F401  (registers reward and task `math`)
