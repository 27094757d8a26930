"""Rollout engines behind the Generator protocol (``HFGenerator`` is imported on first use: transformers)."""

from typing import Any

from critique_rl.rollout.base import Completion, Generator, SamplingParams, engine_is_separate, engine_sleep

__all__ = ["Completion", "Generator", "HFGenerator", "SamplingParams", "engine_is_separate", "engine_sleep"]


def __getattr__(name: str) -> Any:
    if name == "HFGenerator":
        from critique_rl.rollout.hf import HFGenerator

        return HFGenerator
    raise AttributeError(f"module 'critique_rl.rollout' has no attribute {name!r}")
