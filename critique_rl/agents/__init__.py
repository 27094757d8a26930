"""Agent loops: multi-turn environments, token-in/token-out trajectories, a batched episode runner, episode
sources for the one trainer (:mod:`critique_rl.agents.source`) and memory inside the loop.

``EpisodeTrainer`` (the trainer on episodes) is imported on first use (it pulls in accelerate and the trainer)."""

from typing import Any

from critique_rl.agents.env import (
    Env,
    EnvFactory,
    GymnasiumTextEnv,
    StepResult,
    Tool,
    ToolError,
    parse_tool_call,
)
from critique_rl.agents.memory import EpisodeMemory
from critique_rl.agents.registry import (
    ENVS,
    EnvSpec,
    EpisodeCritic,
    TranscriptCritic,
    get_env_spec,
    register_env,
)
from critique_rl.agents.runner import EpisodeLimits, arun_episodes, run_episodes
from critique_rl.agents.trajectory import TINY_CHAT_TEMPLATE, Trajectory, Turn, TurnRenderer

__all__ = [
    "ENVS", "TINY_CHAT_TEMPLATE", "Env", "EnvFactory", "EnvSpec", "EpisodeCritic", "EpisodeLimits", "EpisodeMemory",
    "EpisodeTrainer", "GymnasiumTextEnv", "StepResult", "Tool", "ToolError", "TranscriptCritic", "Trajectory", "Turn",
    "TurnRenderer", "arun_episodes", "get_env_spec", "parse_tool_call", "register_env", "run_episodes",
]


def __getattr__(name: str) -> Any:
    if name == "EpisodeTrainer":
        from critique_rl.agents.source import EpisodeTrainer

        return EpisodeTrainer
    raise AttributeError(f"module 'critique_rl.agents' has no attribute {name!r}")
