"""Reward functions, their registry, rubric gates, and scoring (aggregation lives in ``critique_rl.algos``)."""

from critique_rl.rewards.base import (
    REWARD_FUNCS,
    RewardFunc,
    TrainerState,
    Verifier,
    acall_reward,
    ascore_rewards,
    build_reward_funcs,
    call_arguments,
    call_reward,
    completion_text,
    func_name,
    register_reward,
    reward_inputs,
    score_rewards,
)
from critique_rl.rewards.builtin import (
    DEFAULT_FORMAT_PATTERNS,
    brier_reward,
    overlong_penalty,
    parse_confidence,
)
from critique_rl.rewards.critic_judge import CriticJudge, judge_verdict  # registers reward "critic"
from critique_rl.rewards.gates import GATES, Gate, aevaluate_gates, build_gates, evaluate_gates, register_gate

__all__ = [
    "CriticJudge",
    "judge_verdict",
    "DEFAULT_FORMAT_PATTERNS",
    "GATES",
    "REWARD_FUNCS",
    "Gate",
    "RewardFunc",
    "TrainerState",
    "Verifier",
    "acall_reward",
    "aevaluate_gates",
    "ascore_rewards",
    "brier_reward",
    "build_gates",
    "build_reward_funcs",
    "call_arguments",
    "call_reward",
    "completion_text",
    "evaluate_gates",
    "func_name",
    "overlong_penalty",
    "parse_confidence",
    "register_gate",
    "register_reward",
    "reward_inputs",
    "score_rewards",
]
