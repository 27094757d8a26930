"""The Generator protocol: any rollout engine (transformers, vLLM, a server) that samples completions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass
class Completion:
    """One sampled completion. ``logprobs`` are the sampling log-probabilities of ``token_ids`` (under
    logits / temperature); ``token_ids`` include the EOS token when the completion finished."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finished: bool


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 16
    greedy: bool = False


@runtime_checkable
class Generator(Protocol):
    """``generate(prompts, params)`` returns, per prompt, ``params.n`` completions.

    Optional: ``generate_ids(prompt_ids, params)``, the same from token ids (multi-turn agents keep contexts as
    ids; :func:`critique_rl.agents.runner.generate_from_ids` falls back to decoded text without it)."""

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]: ...

    def sync_weights(self) -> None:
        """Make the engine sample from the policy's current weights (no-op when they share memory)."""
        ...


def engine_is_separate(engine: object) -> bool:
    """Whether ``engine`` samples with weights or kernels of its own (vLLM), so its log-probs differ from the
    trained module's and truncated importance sampling applies. Engines say so with a ``separate_sampler``
    attribute; one without it samples from the trained module itself (``HFGenerator``)."""
    return bool(getattr(engine, "separate_sampler", False))


def engine_sleep(engine: object) -> None:
    """Ask a colocated engine to free its accelerator memory for the update (``sleep()``, when it has one)."""
    sleep = getattr(engine, "sleep", None)
    if callable(sleep):
        sleep()
