"""Critics: batched critiques of policy responses (Critique-GRPO, arXiv:2506.03106).

``RuleCritic`` (templates, no model), ``HFCritic`` (a local transformers model, or the policy itself),
``OpenAICritic`` (any OpenAI-compatible endpoint), and ``build_critic(cfg)`` for a ``CriticConfig``.
Backends import their heavy dependencies (torch, openai) lazily.
"""

from critique_rl.critics.base import (
    BaseCritic,
    Critic,
    CriticStats,
    Critique,
    CritiqueKind,
    CritiqueRequest,
    parse_verdict,
    render_rule,
)
from critique_rl.critics.factory import build_critic
from critique_rl.critics.hf import HFCritic
from critique_rl.critics.openai_api import OpenAICritic
from critique_rl.critics.rule import RuleCritic

__all__ = [
    "BaseCritic",
    "Critic",
    "CriticStats",
    "Critique",
    "CritiqueKind",
    "CritiqueRequest",
    "HFCritic",
    "OpenAICritic",
    "RuleCritic",
    "build_critic",
    "parse_verdict",
    "render_rule",
]
