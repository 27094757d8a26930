"""The Critique-GRPO stages of a single-turn step (arXiv:2506.03106): critiques and refinements (or injected
reference answers), the mixed n + k groups and their advantages, the update batch under the plain prompt, and
directive distillation from the critique-conditioned teacher. Functions of a :class:`StepContext`; each returns
new values and changes none of its inputs."""

from __future__ import annotations

import dataclasses

import torch

from critique_rl.algos import aggregate_rewards, apply_gates, sampled_token_advantage
from critique_rl.config import TrainConfig
from critique_rl.rollout.base import Completion, SamplingParams
from critique_rl.train import distributed as dist
from critique_rl.train import selection
from critique_rl.train.batching import pack
from critique_rl.train.critique_step import (
    choose_refinements,
    critique_requests,
    refine_text,
    select_for_critique,
)
from critique_rl.train.rollout_batch import AdvantagePlan, CritiqueResult, RolloutBatch
from critique_rl.train.step_context import Models, StepContext
from critique_rl.train.update import UpdateBatch, score_tokens


def critique_and_refine(ctx: StepContext, batch: RolloutBatch) -> CritiqueResult | None:
    """Critique the selected responses, sample one refinement each, score them (Critique-GRPO). None when no
    row is selected (or the run has no refinements)."""
    cfg = ctx.cfg
    if not ctx.refines:
        return None
    n = batch.group_size
    mode = "all" if cfg.distill_on == "all" and cfg.distill_weight > 0 else cfg.critique_on
    idx = select_for_critique(batch.correct, n, mode)
    if not idx:
        return None
    if cfg.refinement_source == "reference":
        return reference_samples(ctx, batch, idx)
    texts = batch.texts
    critiques = ctx.critic.critique(critique_requests(ctx.task, batch.rows, texts, batch.correct, idx))
    teacher_prompts = [
        ctx.fmt.text({"prompt": refine_text(batch.rows[i]["prompt"], texts[i], c.text, cfg.critic.template_dir)})
        for i, c in zip(idx, critiques, strict=True)
    ]
    refine_idx = idx if mode == cfg.critique_on else select_for_critique(batch.correct, n, cfg.critique_on)
    pos = {i: j for j, i in enumerate(idx)}
    ref_src = [i for i in refine_idx if i in pos]
    params = SamplingParams(n=1, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=ctx.fmt.max_new_tokens)
    outs = ctx.engine.generate([teacher_prompts[pos[i]] for i in ref_src], params) if ref_src else []
    ref_completions = [o[0] for o in outs]
    ref_rows = [batch.rows[i] for i in ref_src]
    if ref_src:
        R_ref, passed_ref, _ = ctx.scorer.score(ref_rows, ref_completions, ctx.step)
    else:
        R_ref, passed_ref = torch.zeros(0, len(ctx.scorer.funcs)), torch.zeros(0, dtype=torch.bool)
    ref_correct = ctx.scorer.correct(ref_rows, ref_completions, ctx.step)
    return CritiqueResult(idx=idx, critiques=critiques, teacher_prompts=teacher_prompts, ref_src=ref_src,
                          ref_completions=ref_completions, ref_rewards=R_ref, ref_passed=passed_ref,
                          ref_correct=ref_correct)


def reference_samples(ctx: StepContext, batch: RolloutBatch, idx: list[int]) -> CritiqueResult:
    """Control arm (``refinement_source: reference``): each selected row's reference completion (the task's
    demonstration format, the ``answer`` on user rows) stands in for a refinement; no critique is written."""
    eos = ctx.fmt.tokenizer.eos_token_id
    ref_rows = [batch.rows[i] for i in idx]
    texts = [ctx.sft_completion(row) for row in ref_rows]
    ids = [(ctx.fmt.encode(t) + ([eos] if eos is not None else []))[: ctx.fmt.max_new_tokens] for t in texts]
    ref_completions = [Completion(token_ids=i, logprobs=[], text=t, finished=bool(i) and i[-1] == eos)
                       for i, t in zip(ids, texts, strict=True)]
    R_ref, passed_ref, _ = ctx.scorer.score(ref_rows, ref_completions, ctx.step)
    return CritiqueResult(idx=[], critiques=[], teacher_prompts=[], ref_src=list(idx),
                          ref_completions=ref_completions, ref_rewards=R_ref, ref_passed=passed_ref,
                          ref_correct=ctx.scorer.correct(ref_rows, ref_completions, ctx.step))


def refinement_slots(ctx: StepContext, crit: CritiqueResult | None) -> int:
    """k: refinement slots per group. With several processes it is constant whenever a critic is on (the
    groups of every process stack into one tensor); with one, a step with no critique has none."""
    if not ctx.refines or (crit is None and ctx.world == 1):
        return 0
    return ctx.cfg.refinements_per_group


def mixed_group(ctx: StepContext, batch: RolloutBatch,
                crit: CritiqueResult | None) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int, int]]]:
    """Rewards ``[G, n+k, K]`` and pass mask ``[G, n+k]`` of initial samples plus kept refinements (empty
    slots: NaN and masked), and the refinements kept as ``(group, slot, j)`` (chosen with ``ctx.rng``)."""
    n, K, G = batch.group_size, batch.rewards.shape[-1], batch.num_groups
    k = refinement_slots(ctx, crit)
    R_mix = torch.full((G, n + k, K), float("nan"))
    R_mix[:, :n] = batch.rewards.view(G, n, K)
    passed_mix = torch.zeros(G, n + k, dtype=torch.bool)
    passed_mix[:, :n] = batch.passed.view(G, n)
    kept: list[tuple[int, int, int]] = []
    if k and crit is not None:
        group_of = [i // n for i in crit.ref_src]
        chosen = choose_refinements(group_of, crit.ref_correct, k, G, ctx.rng)
        for g, js in enumerate(chosen):
            for slot, j in enumerate(js):
                R_mix[g, n + slot] = crit.ref_rewards[j]
                passed_mix[g, n + slot] = bool(crit.ref_passed[j])
                kept.append((g, n + slot, j))
    return R_mix, passed_mix, kept


def advantages(ctx: StepContext, batch: RolloutBatch, crit: CritiqueResult | None) -> AdvantagePlan:
    """Advantages over the mixed groups. Groups are whole inside a process; the aggregator runs on the
    groups of all processes (so batch statistics such as GDPO's whitening are global) and each process
    keeps its own rows. Gated-out samples, empty slots and dropped groups get mask False."""
    cfg = ctx.cfg
    R_mix, passed_mix, kept = mixed_group(ctx, batch, crit)
    G = R_mix.shape[0]
    R_all, passed_all = dist.gather_tensor(R_mix), dist.gather_tensor(passed_mix)
    mask, groups_kept = apply_gates(torch.ones_like(passed_all), passed_all)
    lv = cfg.low_variance_filter
    lv_drop = None
    if lv.enabled:  # DRO: on the gathered initial samples, so every rank drops the same groups
        n = batch.group_size
        std = selection.group_reward_std(R_all[:, :n].reshape(-1, R_all.shape[-1]), ctx.scorer.weights, n)
        lv_drop = selection.low_variance_drop(std, lv.min_std, lv.drop_fraction)
        mask = mask & ~lv_drop.unsqueeze(-1)
    adv, diag = aggregate_rewards(
        cfg.reward_aggregator, R_all, ctx.scorer.weights, mask,
        estimator=cfg.advantage_estimator, w_lambda=cfg.w_lambda, reward_threshold=cfg.reward_threshold,
    )
    diag["groups_kept"] = groups_kept.float().mean().item()
    if lv_drop is not None:
        diag["low_variance_dropped"] = int(lv_drop.sum())
    mine = slice(ctx.rank * G, (ctx.rank + 1) * G)
    return AdvantagePlan(advantages=adv[mine], mask=mask[mine], kept=kept, diagnostics=diag)


def update_batch(ctx: StepContext, batch: RolloutBatch, crit: CritiqueResult | None,
                 plan: AdvantagePlan) -> tuple[UpdateBatch, dict[str, float]]:
    """Loss rows: the initial samples, then kept refinements, all under the plain (sampling) prompt; per-token
    advantages ``w_eval * A_group (+ w_dir * A_distill)``; reference log-probs when the KL term is on."""
    cfg = ctx.cfg
    n = batch.group_size
    encoded = {p: ctx.fmt.encode(p) for p in set(batch.prompts)}  # n samples share one prompt
    prompt_ids = [encoded[p] for p in batch.prompts]
    comp_ids = [c.token_ids for c in batch.completions]
    row_adv = plan.advantages[:, :n].reshape(-1).tolist()
    row_mask = plan.mask[:, :n].reshape(-1).tolist()
    offpolicy = [False] * len(comp_ids)
    for g, slot, j in plan.kept:
        prompt_ids.append(prompt_ids[g * n])
        comp_ids.append(crit.ref_completions[j].token_ids)  # type: ignore[union-attr]
        row_adv.append(plan.advantages[g, slot].item())
        row_mask.append(bool(plan.mask[g, slot]))
        offpolicy.append(True)
    tokens = pack(prompt_ids, comp_ids, ctx.fmt.tokenizer.pad_token_id)
    tokens.completion_mask *= torch.tensor(row_mask, dtype=tokens.completion_mask.dtype).unsqueeze(-1)
    adv_tok = cfg.eval_weight * torch.tensor(row_adv).unsqueeze(-1).expand(-1, tokens.completion_len).clone()
    sampling_logp = None
    if all(len(c.logprobs) == len(c.token_ids) for c in batch.completions):  # engine log-probs: TIS, mismatch
        sampling_logp = torch.zeros(len(comp_ids), tokens.completion_len)
        for i, c in enumerate(batch.completions):
            sampling_logp[i, : len(c.logprobs)] = torch.tensor(c.logprobs, dtype=torch.float32)
        # refinement rows: log-probs under the critique they were sampled with (offpolicy_weighting); an
        # injected reference answer has none and keeps 0 (a deterministic source)
        for row, (_g, _slot, j) in enumerate(plan.kept, start=len(batch.completions)):
            lp = crit.ref_completions[j].logprobs  # type: ignore[union-attr]
            if lp:
                sampling_logp[row, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
    ub = UpdateBatch(tokens=tokens, advantages=adv_tok, offpolicy=torch.tensor(offpolicy), sampling_logp=sampling_logp)
    distill_metrics: dict[str, float] = {}
    if crit and cfg.distill_weight > 0:
        ub, distill_metrics = directive_distillation(ctx, ub, crit, batch)
    if cfg.kl_beta > 0:
        ub = dataclasses.replace(ub, ref_logp=reference_logprobs(ctx.models, cfg, ub))
    return ub, distill_metrics


def reference_logprobs(models: Models, cfg: TrainConfig, ub: UpdateBatch) -> torch.Tensor:
    """log pi_ref of the loss tokens: the frozen copy, or (LoRA) the same model with the adapter disabled."""
    acc = models.accelerator
    tokens = ub.tokens.to(acc.device)
    if models.ref_model is not None:
        return score_tokens(models.ref_model, tokens, cfg.temperature, cfg.mini_batch_size, acc.autocast)[0]
    from critique_rl.lora import adapter_disabled

    with adapter_disabled(models.policy):
        return score_tokens(models.policy, tokens, cfg.temperature, cfg.mini_batch_size, acc.autocast)[0]


def directive_distillation(ctx: StepContext, ub: UpdateBatch, crit: CritiqueResult,
                           batch: RolloutBatch) -> tuple[UpdateBatch, dict[str, float]]:
    """Teacher = the policy (or its EMA copy) on the critique-conditioned prompt; student = the policy on q; both
    scored on the student's own tokens. Returns ``ub`` with w_dir * A_distill added to the per-token advantages
    (sampled_token) or with the teacher's top-K for the divergence term (topk_logits), and the metrics."""
    cfg = ctx.cfg
    idx = crit.idx
    T = ub.tokens.completion_len
    comp = [batch.completions[i].token_ids for i in idx]
    teacher = pack([ctx.fmt.encode(p) for p in crit.teacher_prompts], comp, ctx.fmt.tokenizer.pad_token_id)
    student = ub.tokens.select(torch.tensor(idx))
    model, dev, ac = ctx.models.policy, ctx.models.accelerator.device, ctx.models.accelerator.autocast
    topk = cfg.distill_topk if cfg.distill_mode == "topk_logits" else None
    teacher_model = ctx.models.teacher if ctx.models.teacher is not None else model
    t_lp, t_tk_lp, t_tk_idx = score_tokens(teacher_model, teacher.to(dev), cfg.temperature, cfg.mini_batch_size,
                                           ac, topk=topk)
    s_lp, _, _ = score_tokens(model, student.to(dev), cfg.temperature, cfg.mini_batch_size, ac)
    Tt = t_lp.shape[1]
    t_lp_full = torch.zeros(len(idx), T)
    t_lp_full[:, : min(T, Tt)] = t_lp[:, :T].cpu()
    m = student.completion_mask.float()
    a_dir = sampled_token_advantage(t_lp_full, s_lp.cpu()) * m
    out = {"distill/kl": ((s_lp.cpu() - t_lp_full) * m).sum().item() / max(1.0, m.sum().item()),
           "distill/rows": len(idx)}
    if cfg.distill_mode == "sampled_token":
        adv = ub.advantages.clone()
        adv[idx] += cfg.distill_weight * a_dir
        return dataclasses.replace(ub, advantages=adv), out
    N, K = ub.advantages.shape[0], t_tk_lp.shape[-1]
    topk_logp = torch.zeros(N, T, K)
    topk_idx = torch.zeros(N, T, K, dtype=torch.long)
    topk_logp[idx, : min(T, Tt)] = t_tk_lp[:, :T].cpu()
    topk_idx[idx, : min(T, Tt)] = t_tk_idx[:, :T].cpu()
    rows = torch.zeros(N, dtype=torch.bool)
    rows[idx] = True
    return dataclasses.replace(ub, teacher_topk_logp=topk_logp, teacher_topk_idx=topk_idx, distill_rows=rows), out
