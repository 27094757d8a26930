"""Shaped off-policy policy-gradient term for refinement tokens (pure functions).

Refinements are sampled from pi(. | q, y, c) but trained under the plain prompt q, so they are off-policy
for pi(. | q). LUFFY (arXiv:2504.14945), used by Critique-GRPO (arXiv:2506.03106), drops the importance
ratio to the behaviour policy and reshapes the token probability instead:

    objective_t = A * f(p_t),  f(p) = p / (p + gamma),  p_t = pi_theta(a_t | q, a_<t)

    grad f(p_t) = gamma * p_t / (p_t + gamma)^2 * grad log p_t

so low-probability tokens (the ones the policy would not have produced itself) get a larger weight than
under plain log-likelihood, which keeps the policy from ignoring them and from collapsing its entropy.
"""

from __future__ import annotations

import torch


def shaped_offpolicy_loss(logp: torch.Tensor, advantages: torch.Tensor, gamma: float | None = 0.1) -> torch.Tensor:
    """Per-token loss ``[B, T]`` = ``-A * p / (p + gamma)`` with ``p = exp(logp)``; no ratio to pi_old.

    ``gamma=None`` disables shaping: ``-A * logp`` (plain off-policy REINFORCE on the refinement tokens).
    ``advantages``: ``[B]``, ``[B, 1]`` or ``[B, T]``.
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    adv = adv.expand_as(logp)
    if gamma is None:
        return -adv * logp
    p = logp.exp()
    return -adv * p / (p + gamma)


def offpolicy_coefficient(logp: torch.Tensor, gamma: float | None = 0.1) -> torch.Tensor:
    """The factor on ``-A * grad log p_t`` that the off-policy term gives each token (a diagnostic, no grad):

        shaped (LUFFY, arXiv:2504.14945):  c(p) = gamma * p / (p + gamma)^2   (at most 1/4, at p = gamma)
        unshaped (``gamma=None``):          c(p) = 1

    An on-policy token at the first PPO iteration has factor 1 (ratio 1), so ``sum |A| c`` over refinement
    tokens against ``sum |A|`` over sampled tokens measures how much of the update the refinements drive.
    """
    if gamma is None:
        return torch.ones_like(logp)
    p = logp.detach().exp()
    return gamma * p / (p + gamma) ** 2


def offpolicy_token_weights(logp: torch.Tensor, behaviour_logp: torch.Tensor, mode: str,
                            cap: float = 2.0) -> torch.Tensor:
    """Per-token weights (no grad) on the off-policy loss of refinement tokens, from the log-probs under the plain
    prompt, ``logp = log pi(a_t | q)``, and under the critique-conditioned prompt they were sampled from,
    ``behaviour_logp = log pi(a_t | q, y, c)`` (0 for an injected reference answer: a deterministic source).

    - ``none``: 1 (Critique-GRPO as published).
    - ``is``: truncated importance weight ``min(pi(a|q) / pi(a|q,y,c), cap)`` (TIS, arXiv:2506.13585 style):
      corrects for sampling from the critique-conditioned policy; it shrinks exactly the tokens the critique
      changed most.
    - ``gap``: ``1 + min(max(behaviour_logp - logp, 0), cap)``: tokens the critique made more likely (the
      directive ones, where teacher and student disagree, as OpenClaw-RL's directive signal, arXiv:2603.10165)
      weigh more; the others keep weight 1.
    """
    if mode == "none":
        return torch.ones_like(logp)
    gap = (behaviour_logp - logp).detach()
    if mode == "is":
        return torch.exp(-gap).clamp(max=cap)
    if mode == "gap":
        return 1.0 + gap.clamp(min=0.0, max=cap)
    raise ValueError(f"offpolicy_weighting must be none, is or gap, got {mode!r}")
