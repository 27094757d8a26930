"""Directive distillation on episodes (``distill_weight > 0``): the teacher sees the episode critique in context,
the student the plain context; both score the student's own action tokens (observation tokens are masked)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from critique_rl.agents.trajectory import Trajectory, TurnRenderer
from critique_rl.algos import sampled_token_advantage
from critique_rl.train.batching import pack
from critique_rl.train.step_context import Models
from critique_rl.train.update import UpdateBatch, score_tokens

if TYPE_CHECKING:
    from critique_rl.agents.source import EpisodeCritiques
    from critique_rl.config import TrainConfig


def distill_episodes(ub: UpdateBatch, trajs: list[Trajectory], rows: list[int], crit: EpisodeCritiques, *,
                     cfg: TrainConfig, models: Models, renderer: TurnRenderer,
                     pad_id: int) -> tuple[UpdateBatch, dict[str, float]]:
    """Directive distillation over action tokens: teacher = the policy (``models.policy``, or the EMA teacher
    ``models.teacher``) with the critique in context, student = the policy under the plain context, both on the
    student's own episode tokens (rows ``rows`` of ``trajs``, in ``ub``'s order; ``pad_id`` pads the teacher's
    prompts). Returns a new batch (``ub`` is not changed: ``sampled_token`` adds the log-ratio to a copy of its
    advantages, ``topk_logits`` adds the teacher's top-K) and the ``distill/*`` metrics."""
    pos = {i: r for r, i in enumerate(rows)}
    pairs = [(pos[i], crit.texts[j]) for j, i in enumerate(crit.idx) if i in pos]
    if not pairs:
        return ub, {}
    sel = [r for r, _ in pairs]
    teacher_prompts = []
    for r, text in pairs:
        x = trajs[rows[r]]
        ctx = "\n\n".join(c for c in (x.memory_context, text) if c)
        teacher_prompts.append(renderer.first(x.turns[0].observation, ctx))
    student = ub.tokens.select(torch.tensor(sel))
    T = ub.tokens.completion_len
    comp = [trajs[rows[r]].completion_ids() for r in sel]
    teacher = pack(teacher_prompts, comp, pad_id)
    model, dev, ac = models.policy, models.accelerator.device, models.accelerator.autocast
    teacher_model = models.teacher if models.teacher is not None else model
    topk = cfg.distill_topk if cfg.distill_mode == "topk_logits" else None
    t_lp, t_tk_lp, t_tk_idx = score_tokens(teacher_model, teacher.to(dev), cfg.temperature, cfg.mini_batch_size,
                                           ac, topk=topk)
    t_lp = t_lp.cpu()
    s_lp = score_tokens(model, student.to(dev), cfg.temperature, cfg.mini_batch_size, ac)[0].cpu()
    Tt = min(T, t_lp.shape[1])
    t_full = torch.zeros(len(sel), T)
    t_full[:, :Tt] = t_lp[:, :T]
    m = student.completion_mask.float()  # action tokens only
    out = {"distill/kl": ((s_lp - t_full) * m).sum().item() / max(1.0, m.sum().item()),
           "distill/rows": float(len(sel))}
    if cfg.distill_mode == "sampled_token":
        adv = ub.advantages.clone()
        adv[sel] += cfg.distill_weight * sampled_token_advantage(t_full, s_lp) * m
        return dataclasses.replace(ub, advantages=adv), out
    # top-K of the teacher at each of the student's positions, for the divergence term of the update
    N, K = ub.advantages.shape[0], t_tk_lp.shape[-1]
    topk_logp = torch.zeros(N, T, K)
    topk_idx = torch.zeros(N, T, K, dtype=torch.long)
    topk_logp[sel, :Tt] = t_tk_lp[:, :T].cpu()
    topk_idx[sel, :Tt] = t_tk_idx[:, :T].cpu()
    distill_rows = torch.zeros(N, dtype=torch.bool)
    distill_rows[sel] = True
    return dataclasses.replace(ub, teacher_topk_logp=topk_logp, teacher_topk_idx=topk_idx,
                               distill_rows=distill_rows), out
