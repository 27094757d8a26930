"""Reward functions, their registry, and multi-objective aggregation."""

from critique_rl.rewards.base import REWARD_FUNCS, RewardFunc, build_reward_funcs, register_reward

__all__ = ["REWARD_FUNCS", "RewardFunc", "build_reward_funcs", "register_reward"]
