"""Token-level directive distillation (pure functions).

Evaluative feedback (a reward) says how good a response was; directive feedback (a critique) says what to
change. OpenClaw-RL (arXiv:2603.10165) and SDPO (arXiv:2601.20802) turn the directive channel into a dense
token-level signal: the teacher is the *same* policy conditioned on the critique, s_enh = (q, critique),
the student is the policy on the plain question q, both scored on the student's own response tokens.
"""

from __future__ import annotations

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


def topk_reverse_kl(
    student_logits: torch.Tensor,
    teacher_topk_logp: torch.Tensor,
    teacher_topk_idx: torch.Tensor,
    *,
    chunk_rows: int = 1024,
) -> torch.Tensor:
    """Reverse KL over the teacher's top-K tokens plus one tail bin, per token ``[B, T]``.

    With S = the teacher's top-K token set at a position, the K+1 bins are the tokens of S and the tail
    (everything else). ``s_k``/``t_k`` are the student's/teacher's probabilities of the bins:

        KL_t = sum_{k in S} s_k (log s_k - log t_k) + s_tail (log s_tail - log t_tail)

    The student's log-probs of the K ids are ``log s_k = z_k - logsumexp(z)`` (``z`` = student logits, the
    logsumexp in row chunks of ``chunk_rows``, see :func:`critique_rl.algos.logprobs.logsumexp_chunked`), so
    no full-vocabulary log_softmax copy is built; ``s_tail = 1 - sum_k s_k``, ``t_tail = 1 - sum_k t_k``
    (both clamped at 1e-8).

    ``student_logits``: ``[B, T, V]`` (with grad); ``teacher_topk_logp``: ``[B, T, K]`` teacher log-probs of
    its top-K tokens (detached); ``teacher_topk_idx``: ``[B, T, K]``. Gradients flow to the student only.
    """
    lse = logsumexp_chunked(student_logits, chunk_rows)
    s_logp = student_logits.gather(-1, teacher_topk_idx).float() - lse.unsqueeze(-1)
    t_logp = teacher_topk_logp.detach().float()
    eps = 1e-8
    s_tail = (1.0 - s_logp.exp().sum(-1)).clamp_min(eps)
    t_tail = (1.0 - t_logp.exp().sum(-1)).clamp_min(eps)
    head = (s_logp.exp() * (s_logp - t_logp)).sum(-1)
    tail = s_tail * (s_tail.log() - t_tail.log())
    return head + tail
