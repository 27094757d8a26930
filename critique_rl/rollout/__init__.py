"""Rollout engines behind the Generator protocol."""

from critique_rl.rollout.base import Completion, Generator, SamplingParams
from critique_rl.rollout.hf import HFGenerator

__all__ = ["Completion", "Generator", "HFGenerator", "SamplingParams"]
