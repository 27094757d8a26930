"""Critic protocol: batched requests in, critiques out (Critique-GRPO, arXiv:2506.03106)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

CritiqueKind = Literal["indicative", "ground_truth", "cot"]


@dataclass
class CritiqueRequest:
    """What a critic sees: the question, the policy's response, and what the verifier knows."""

    question: str
    response: str
    reference: str | None = None
    """Reference answer, when the task has one (needed by `ground_truth` critiques)."""
    verdict: bool | None = None
    """The verifier's verdict on the response, when known."""
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Critique:
    """A critic's answer. ``fallback`` is True when the configured kind could not be had."""

    text: str
    verdict: bool | None
    kind: str
    latency_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    fallback: bool = False
    error: str | None = None
    regenerations: int = 0
    cached: bool = False


@runtime_checkable
class Critic(Protocol):
    """Anything with batched ``critique`` (and ``acritique``) is a critic."""

    kind: str

    def critique(self, requests: list[CritiqueRequest]) -> list[Critique]: ...

    async def acritique(self, requests: list[CritiqueRequest]) -> list[Critique]: ...

    def metrics(self) -> dict[str, float]: ...
