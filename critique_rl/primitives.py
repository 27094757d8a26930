"""Small helpers every layer uses, at the bottom of the import graph (this module imports only the standard
library): the final-answer span and the number in it, the text of a (conversational) completion, a URL safe to
log, and the user's decision utility with its Bayes threshold.

Tasks, rewards, critics, memory, rollout engines and the trainer import these from here, so no module reaches
back up the layers for a one-line helper (and ``rewards -> tasks -> rewards`` is no longer a circle).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANSWER_IS = re.compile(r"(?:final answer|answer)\s*(?:is|:)\s*\**\s*([^\s*]+)", re.IGNORECASE)
_HASHES = re.compile(r"####\s*(\S+)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_CONFIDENCE = re.compile(r"<confidence>.*?</confidence>", re.DOTALL | re.IGNORECASE)

DEFAULT_BASE_URL = "https://api.openai.com/v1"

Message = dict[str, Any]


def final_answer_span(completion: str) -> str:
    """The part of a completion that states the final answer: ``\\boxed{}``, ``#### x``, ``answer is x``,
    else the whole text. Confidence tags are removed first."""
    text = _CONFIDENCE.sub(" ", completion)
    for pattern in (_BOXED, _HASHES, _ANSWER_IS):
        found = pattern.findall(text)
        if found:
            return found[-1]
    return text


def parse_number(completion: str) -> float | None:
    """Last number in the final-answer span (commas allowed as thousands separators), else None."""
    nums = _NUMBER.findall(final_answer_span(completion))
    if not nums:
        return None
    try:
        return float(nums[-1].replace(",", ""))
    except ValueError:
        return None


def completion_text(completion: str | list[Message] | Any) -> str:
    """The text of a completion: a string as is; a conversational completion (list of messages, TRL's
    ``[{"role": "assistant", "content": ...}]``) -> its assistant content (the last message's when none is
    marked assistant). Content given as parts (``[{"type": "text", "text": ...}]``) is joined."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, list | tuple):
        msgs = [m for m in completion if isinstance(m, dict)]
        chosen = [m for m in msgs if m.get("role") == "assistant"] or msgs[-1:]
        return "".join(_content_text(m.get("content")) for m in chosen)
    return str(completion)


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return str(content)


def safe_url(url: str | None) -> str:
    """``url`` without user info, query or fragment (safe to log and print)."""
    parts = urlsplit(url or DEFAULT_BASE_URL)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return f"{parts.scheme}://{netloc}{parts.path}".rstrip("/")


@dataclass(frozen=True)
class Utility:
    """The user's utility: reward for a right answer, penalty (a positive number) for a wrong one, value of
    abstaining."""

    reward_right: float = 1.0
    penalty_wrong: float = 1.0
    abstain_value: float = 0.0

    def __post_init__(self) -> None:
        for name in ("reward_right", "penalty_wrong", "abstain_value"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number")
        if self.reward_right + self.penalty_wrong <= 0:
            raise ValueError("reward_right + penalty_wrong must be > 0 (a right answer must beat a wrong one)")


def bayes_threshold(u: Utility) -> float:
    """Answer iff ``q r - (1 - q) p >= a``, i.e. ``q >= (a + p) / (r + p)`` (for a calibrated ``q``)."""
    return (u.abstain_value + u.penalty_wrong) / (u.reward_right + u.penalty_wrong)
