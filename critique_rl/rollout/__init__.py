"""Rollout engines behind the Generator protocol."""

from critique_rl.rollout.base import Completion, Generator, SamplingParams, engine_is_separate, engine_sleep
from critique_rl.rollout.hf import HFGenerator

__all__ = ["Completion", "Generator", "HFGenerator", "SamplingParams", "engine_is_separate", "engine_sleep"]
