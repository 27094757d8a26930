"""Which prompts a step trains on: the draw from the prompt sampler (a phase's data or task weights, one task at a
time under ``task_order``), dynamic sampling's refills, the pass-rate filter's measurement and the task order's
entropy measurement. A mixin of :class:`CritiqueGRPOTrainer`; the pure decisions live in
:mod:`critique_rl.train.selection` and :mod:`critique_rl.train.task_mix`."""

from __future__ import annotations

import json
import time
from typing import Any

import torch

from critique_rl.rewards import TrainerState, evaluate_gates, reward_inputs, score_rewards
from critique_rl.rollout import Completion, SamplingParams
from critique_rl.train import distributed as dist
from critique_rl.train import selection, task_mix
from critique_rl.train.rollout_batch import RolloutBatch
from critique_rl.train.run_setup import _Timer, cfg_bs, console


class PromptSelectionMixin:
    """The prompt-drawing and data-selection stages of a step (see the module docstring)."""

    def _sample_groups(self, rows: list[dict[str, Any]],
                       contexts: list[str] | None) -> tuple[list[dict[str, Any]], list[str], list[Completion]]:
        """Sample n completions per prompt. Returns flat ``(rows, prompts, completions)`` of length B*n."""
        cfg = self.cfg
        prompts = [self.prompt_text(r, contexts[i] if contexts else None) for i, r in enumerate(rows)]
        params = SamplingParams(n=cfg.num_generations, temperature=cfg.temperature, top_p=cfg.top_p,
                                max_new_tokens=self.max_new_tokens)
        groups = self.generator.generate(prompts, params)
        n = cfg.num_generations
        return ([r for r in rows for _ in range(n)], [p for p in prompts for _ in range(n)],
                [c for g in groups for c in g])

    def _reward_inputs(self, rows: list[dict[str, Any]], completions: list[Completion]) -> tuple[list, list, dict]:
        """``(prompts, completions, columns)`` as TRL passes them to reward functions, gates and verifiers:
        messages when a chat template is in use, else strings; every dataset column, ``completion_ids``,
        ``trainer_state``, plus ``completion_lengths`` and ``truncated``."""
        return reward_inputs(
            rows, [c.text for c in completions], [c.token_ids for c in completions], conversational=self.use_chat,
            trainer_state=TrainerState(global_step=self.step, max_steps=self.cfg.max_steps),
            extra={"completion_lengths": [len(c.token_ids) for c in completions],
                   "truncated": [not c.finished for c in completions]})

    def _score(self, rows: list[dict[str, Any]], completions: list[Completion]) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Reward matrix ``[N, K]`` (NaN = not applicable), gate pass mask ``[N]`` and gate pass rates."""
        prompts, comps, columns = self._reward_inputs(rows, completions)
        R = score_rewards(self.reward_funcs, prompts, comps, columns)
        if not self.gates:
            return R, torch.ones(len(rows), dtype=torch.bool), {}
        passed, rates = evaluate_gates(self.gates, prompts, comps, columns)
        return R, passed, rates

    def _correct(self, rows: list[dict[str, Any]], completions: list[Completion]) -> list[bool]:
        return self.verify.check(*self._reward_inputs(rows, completions)) if completions else []

    def _score_batch(self, rows: list[dict[str, Any]], prompts: list[str], completions: list[Completion]) -> RolloutBatch:
        R, passed, rates = self._score(rows, completions)
        correct = self._correct(rows, completions)
        return RolloutBatch(rows=rows, prompts=prompts, completions=completions, group_size=self.cfg.num_generations,
                            rewards=R, passed=passed, correct=correct, gate_rates=rates)

    def _next_prompts(self) -> tuple[list[dict[str, Any]], list[str] | None]:
        """This process's shard of the global prompt batch, and the memory context of each (or None)."""
        sampler = self._phase_sampler or self.sampler
        if self._task_blocks and sampler is self.sampler:  # task_order entropy / listed: one task at a time
            rows = self.sampler.next_batch(self.cfg.prompts_per_step, only=task_mix.task_at(self.step, self._task_blocks))
        elif self._phase_task_weights and sampler is self.sampler:
            rows = self.sampler.next_batch(self.cfg.prompts_per_step, weights=self._phase_task_weights)
        else:
            rows = sampler.next_batch(self.cfg.prompts_per_step)
        contexts = None
        if self.memory_on:
            contexts = dist.broadcast_object(self.memory_hook.contexts(rows) if self.is_main else None)
            contexts = dist.shard(contexts, self.rank, self.world)
        return dist.shard(rows, self.rank, self.world), contexts

    def _draw_batch(self, timer: _Timer) -> RolloutBatch:
        """Draw this process's prompts (global batch, sharded), sample n completions each and score them."""
        with timer("generate"):
            rows, contexts = self._next_prompts()
            sampled = self._sample_groups(rows, contexts)
        with timer("score"):
            return self._score_batch(*sampled)

    def _collect_batch(self, timer: _Timer) -> tuple[RolloutBatch, dict[str, Any]]:
        """The step's batch: one draw, or (``dynamic_sampling``) zero-spread groups dropped and refilled
        (:func:`selection.dynamic_fill`). Logs the zero-spread share of the first draw either way."""
        ds = self.cfg.dynamic_sampling
        fill = selection.dynamic_fill(self._draw_batch(timer), lambda: self._draw_batch(timer),
                                      ds.max_refill_batches, dist.all_reduce_sum, enabled=ds.enabled)
        self._selection.samples_total += fill.samples
        out: dict[str, Any] = {"train/zero_spread_groups": fill.first_zero_spread,
                               "selection/samples": fill.samples,
                               "selection/samples_total": self._selection.samples_total}
        if ds.enabled:
            out.update({"selection/refills": fill.refills, "selection/zero_spread_dropped": fill.dropped,
                        "selection/zero_spread_padded": fill.padded})
        if self.cfg.pass_rate_filter.enabled:
            out["selection/pool_size"] = len(self.sampler.rows) - len(self.sampler.excluded)
        return fill.batch, out

    def _measure_pass_rates(self) -> dict[str, Any]:
        """``pass_rate_filter``: sample each measured prompt ``samples`` times, drop those too hard / too easy from
        the sampler's pool. Processes measure disjoint shares of the prompts; the rates are gathered, so every
        rank takes the same decision. Returns ``selection/pass_rate_*`` metrics."""
        pf = self.cfg.pass_rate_filter
        t0 = time.perf_counter()
        measured = selection.measured_indices(len(self.train_rows), pf.max_prompts, self.cfg.seed)
        mine = measured[self.rank :: self.world]
        params = SamplingParams(n=pf.samples, temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                                max_new_tokens=self.max_new_tokens)
        rates: dict[int, float] = {}
        chunk = max(1, cfg_bs(self.cfg) // pf.samples)
        for s in range(0, len(mine), chunk):
            idx = mine[s : s + chunk]
            rows = [self.train_rows[i] for i in idx]
            groups = self.generator.generate([self.prompt_text(r) for r in rows], params)
            flat_rows = [r for r in rows for _ in range(pf.samples)]
            ok = self._correct(flat_rows, [c for g in groups for c in g])
            for j, i in enumerate(idx):
                rates[i] = sum(ok[j * pf.samples : (j + 1) * pf.samples]) / pf.samples
        rates = {i: r for part in dist.gather_objects(rates) for i, r in part.items()}
        hard, easy = selection.pass_rate_exclusions(rates, pf.too_hard_at_most, pf.too_easy_at_least)
        total = len(self.train_rows)
        applied = self.sampler.can_exclude(hard | easy, self.cfg.prompts_per_step)
        if applied:
            self.sampler.exclude(hard | easy)
        elif self.is_main:
            console.print(f"[bold yellow]warning: pass_rate_filter would leave {total - len(hard | easy)} of {total} "
                          f"prompts ({len(hard)} too hard, {len(easy)} too easy), fewer than one batch "
                          f"({self.cfg.prompts_per_step}); the pool is left as it was[/]", soft_wrap=True)
        self._selection.samples_total += len(measured) * pf.samples
        if self.is_main:  # what the filter removed, prompt by prompt (rewritten if a resumed run measures again)
            folder = self.out / "selection"
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / f"pass_rates_step{self.step:06d}.jsonl", "w") as fh:
                for i in sorted(rates):
                    reason = "too_hard" if i in hard else "too_easy" if i in easy else None
                    fh.write(json.dumps({"index": i, "prompt": self.train_rows[i]["prompt"],
                                         "pass_rate": rates[i], "dropped": reason if applied else None}) + "\n")
        info = {"selection/pass_rate_measured": len(rates), "selection/pass_rate_mean": sum(rates.values()) / max(1, len(rates)),
                "selection/pass_rate_too_hard": len(hard), "selection/pass_rate_too_easy": len(easy),
                "selection/pass_rate_applied": int(applied), "selection/pool_size": total - len(self.sampler.excluded),
                "selection/pass_rate_samples": len(measured) * pf.samples,
                "time/pass_rate": time.perf_counter() - t0}
        self._selection.pass_rate = info
        return info

    def _order_tasks(self) -> dict[str, Any]:
        """``task_order`` entropy / listed: the order of the tasks and the RL steps of each (kept in the
        checkpoint). ``entropy`` samples ``task_order_prompts`` prompts per task ``num_generations`` times on the
        policy as RL starts; processes measure disjoint shares and sum their token counts, so all agree."""
        cfg = self.cfg
        info: dict[str, Any] = {}
        order = list(cfg.tasks)
        if cfg.task_order == "entropy":
            t0 = time.perf_counter()
            params = SamplingParams(n=cfg.num_generations, temperature=cfg.temperature, top_p=cfg.top_p,
                                    max_new_tokens=self.max_new_tokens)
            sums: dict[str, list[float]] = {}
            per_call = max(1, cfg_bs(cfg) // cfg.num_generations)  # prompts per generate call
            for name in order:
                idx = self.sampler.index[name]
                chosen = [idx[i] for i in selection.measured_indices(len(idx), cfg.task_order_prompts, cfg.seed)]
                mine = [self.train_rows[i] for i in chosen[self.rank :: self.world]]
                nll, toks = 0.0, 0
                for s in range(0, len(mine), per_call):
                    chunk = mine[s : s + per_call]
                    for group in self.generator.generate([self.prompt_text(r) for r in chunk], params):
                        for c in group:
                            nll -= sum(c.logprobs)
                            toks += len(c.logprobs)
                sums[name] = [nll, float(toks)]
            parts = dist.gather_objects(sums)
            entropy = {n: task_mix.token_entropy(sum(p[n][0] for p in parts), int(sum(p[n][1] for p in parts)))
                       for n in order}
            order = task_mix.entropy_order(entropy)
            self._selection.task_entropy = entropy
            info.update({f"order/entropy/{n}": h for n, h in entropy.items()})
            info["time/task_order"] = time.perf_counter() - t0
        self._selection.task_order = order
        self._task_blocks = task_mix.task_blocks(order, cfg.tasks, cfg.max_steps)
        self.summary["task_order"] = [{"task": n, "first_step": a + 1, "last_step": b} for n, a, b in self._task_blocks]
        if self._selection.task_entropy is not None:
            self.summary["task_entropy"] = self._selection.task_entropy
        if self.is_main:
            console.print("task order: " + ", ".join(f"{n} (steps {a + 1}-{b})" for n, a, b in self._task_blocks))
        return info
