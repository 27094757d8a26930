"""Token-level directive distillation (pure functions).

Evaluative feedback (a reward) says how good a response was; directive feedback (a critique) says what to
change. OpenClaw-RL (arXiv:2603.10165) and SDPO (arXiv:2601.20802) turn the directive channel into a dense
token-level signal: the teacher is the *same* policy conditioned on the critique, s_enh = (q, critique),
the student is the policy on the plain question q, both scored on the student's own response tokens.
"""

from __future__ import annotations

import math

import torch

from critique_rl.algos.logprobs import logsumexp_chunked


def sampled_token_advantage(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """Per-token directive advantage ``A_t = log pi(a_t | s_enh, a_<t) - log pi(a_t | q, a_<t)``.

    Both inputs are detached ``[B, T]`` log-probabilities of the student's sampled tokens. Fed to the clipped
    policy-gradient loss, ``-A_t * log pi(a_t | q)`` is a single-sample estimator of the gradient of the
    reverse KL ``KL(pi(.|q) || pi(.|s_enh))`` (tokens the critique makes likelier are pushed up).
    Combined with the group advantage as ``A_t^total = w_eval * A_group + w_dir * A_t``.
    """
    return (teacher_logp - student_logp).detach()


DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")
"""Divergences of :func:`topk_divergence` (GKD, arXiv:2306.13649, compares the three for on-policy distillation)."""


def topk_divergence(
    student_logits: torch.Tensor,
    teacher_topk_logp: torch.Tensor,
    teacher_topk_idx: torch.Tensor,
    kind: str = "reverse_kl",
    *,
    beta: float = 0.5,
    chunk_rows: int = 1024,
) -> torch.Tensor:
    """A divergence between student and teacher over the teacher's top-K tokens plus one tail bin, per token ``[B, T]``.

    With S = the teacher's top-K token set at a position, the K+1 bins are the tokens of S and the tail
    (everything else); ``s_k``/``t_k`` are the student's/teacher's probabilities of the bins, summed over bins b:

        reverse_kl: KL(s || t) = sum_b s_b (log s_b - log t_b)            (mode-seeking; SDPO arXiv:2601.20802)
        forward_kl: KL(t || s) = sum_b t_b (log t_b - log s_b)            (mode-covering)
        jsd:        beta KL(t || m) + (1 - beta) KL(s || m),  m = beta t + (1 - beta) s   (GKD arXiv:2306.13649)

    The gradient with respect to the student's logit of bin b is ``s_b (log s_b - log t_b - KL)`` for reverse
    KL but ``s_b - t_b`` for forward KL: when the student is confidently wrong (s of the teacher's token ~ 0,
    the plateau), reverse KL barely pulls towards the teacher's token, forward KL pulls with about t_b.

    The student's log-probs of the K ids are ``log s_k = z_k - logsumexp(z)`` (``z`` = student logits, the
    logsumexp in row chunks of ``chunk_rows``, see :func:`critique_rl.algos.logprobs.logsumexp_chunked`), so
    no full-vocabulary log_softmax copy is built; ``s_tail = 1 - sum_k s_k``, ``t_tail = 1 - sum_k t_k``
    (both clamped at 1e-8).

    ``student_logits``: ``[B, T, V]`` (with grad); ``teacher_topk_logp``: ``[B, T, K]`` teacher log-probs of
    its top-K tokens (detached); ``teacher_topk_idx``: ``[B, T, K]``. Gradients flow to the student only.
    """
    if kind not in DIVERGENCES:
        raise ValueError(f"kind must be one of {DIVERGENCES}, got {kind!r}")
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    lse = logsumexp_chunked(student_logits, chunk_rows)
    s_logp = student_logits.gather(-1, teacher_topk_idx).float() - lse.unsqueeze(-1)
    t_logp = teacher_topk_logp.detach().float()
    eps = 1e-8
    s_tail = (1.0 - s_logp.exp().sum(-1, keepdim=True)).clamp_min(eps)
    t_tail = (1.0 - t_logp.exp().sum(-1, keepdim=True)).clamp_min(eps)
    s_bins = torch.cat([s_logp, s_tail.log()], -1)  # [B, T, K+1] log-probs of the K+1 bins
    t_bins = torch.cat([t_logp, t_tail.log()], -1)
    if kind == "reverse_kl":
        return (s_bins.exp() * (s_bins - t_bins)).sum(-1)
    if kind == "forward_kl":
        return (t_bins.exp() * (t_bins - s_bins)).sum(-1)
    m_bins = torch.logaddexp(t_bins + math.log(beta), s_bins + math.log(1.0 - beta))
    return beta * (t_bins.exp() * (t_bins - m_bins)).sum(-1) + (1.0 - beta) * (s_bins.exp() * (s_bins - m_bins)).sum(-1)


def topk_reverse_kl(
    student_logits: torch.Tensor,
    teacher_topk_logp: torch.Tensor,
    teacher_topk_idx: torch.Tensor,
    *,
    chunk_rows: int = 1024,
) -> torch.Tensor:
    """``topk_divergence(..., kind="reverse_kl")``: reverse KL over the teacher's top-K tokens plus a tail bin."""
    return topk_divergence(student_logits, teacher_topk_logp, teacher_topk_idx, "reverse_kl", chunk_rows=chunk_rows)
