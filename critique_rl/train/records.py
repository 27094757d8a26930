"""What a run writes and reads back: per-step metrics (metrics.jsonl and trackers), rollouts.jsonl, memory
updates, critic failure checks, run totals, and checkpoints (save and restore). A mixin of
:class:`CritiqueGRPOTrainer`; every write happens on the main process only."""


from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from critique_rl.errors import UserError
from critique_rl.train import checkpoint as ckpt
from critique_rl.train import distributed as dist
from critique_rl.train import task_mix
from critique_rl.train.metrics import read_jsonl
from critique_rl.train.rollout_batch import AdvantagePlan, CritiqueResult, RolloutBatch
from critique_rl.train.run_setup import CRITIC_MIN_REQUESTS, _critic_counts, _restore_critic_counts, console
from critique_rl.train.selection import SelectionState
from critique_rl.train.trackers import scalars


class RecordsMixin:
    """Metrics, rollouts, checkpoints."""

    def _metrics(self, batch: RolloutBatch, crit: CritiqueResult | None, plan: AdvantagePlan) -> dict[str, Any]:
        """This process's per-step metrics (merged over processes by :func:`dist.merge_metrics`)."""
        metrics: dict[str, Any] = {"step": self.step + 1}
        for gname, rate in batch.gate_rates.items():
            metrics[f"gate/{gname}/pass_rate"] = rate
        metrics["completions/mean_length"] = float(np.mean([len(c.token_ids) for c in batch.completions]))
        metrics["completions/finished"] = float(np.mean([c.finished for c in batch.completions]))
        if crit is not None:
            all_wrong = batch.grouped_correct().sum(-1) == 0
            rescued = {g for g, _, j in plan.kept if crit.ref_correct[j] and bool(all_wrong[g])}
            metrics["critique/critiqued"] = len(crit.idx)
            metrics["critique/refinements"] = len(crit.ref_src)
            metrics["critique/refine_success_rate"] = float(np.mean(crit.ref_correct)) if crit.ref_src else None
            metrics["critique/kept"] = len(plan.kept)
            metrics["critique/groups_rescued"] = len(rescued)
            metrics["critique/all_wrong_groups"] = int(all_wrong.sum())
            metrics["critique/fallbacks"] = sum(c.fallback for c in crit.critiques)
        if self.critic is not None:
            metrics.update({k: v for k, v in self.critic.metrics().items() if isinstance(v, (int, float))})
        return metrics

    def _global_metrics(self, batch: RolloutBatch, plan: AdvantagePlan) -> dict[str, Any]:
        """Reward and accuracy statistics over the samples of every process (gathered, not averaged)."""
        R = dist.gather_tensor(batch.rewards)
        grouped = dist.gather_tensor(batch.grouped_correct())
        diag = plan.diagnostics
        n = batch.group_size
        out: dict[str, Any] = {}
        for k, name in enumerate(self.reward_names):
            valid = R[:, k][~torch.isnan(R[:, k])]
            out[f"reward/{name}/mean"] = valid.mean().item() if len(valid) else None
            out[f"reward/{name}/std"] = valid.std(unbiased=False).item() if len(valid) else None
            out[f"reward/{name}/weight"] = float(diag["effective_weight"][k])
        out["gate/groups_kept"] = diag["groups_kept"]
        if "low_variance_dropped" in diag:
            out["selection/low_variance_dropped"] = diag["low_variance_dropped"]
        out["reward/mean"] = (torch.nan_to_num(R, nan=0.0) * self.reward_weights).sum(-1).mean().item()
        out["train/accuracy"] = grouped.mean().item()
        out["train/all_wrong_groups"] = (grouped.sum(-1) == 0).float().mean().item()
        out["train/all_right_groups"] = (grouped.sum(-1) == n).float().mean().item()
        if any("task" in r for r in batch.rows):  # several tasks: accuracy, reward and share of each
            names = [t for part in dist.gather_objects([r.get("task") for r in batch.rows]) for t in part]
            weighted = (torch.nan_to_num(R, nan=0.0) * self.reward_weights).sum(-1)
            out.update(task_mix.per_task_metrics(names, grouped.reshape(-1).tolist(), weighted.tolist()))
        return out

    def _memory_update(self, batch: RolloutBatch, crit: CritiqueResult | None) -> dict[str, Any]:
        """Record and credit on the main process, from the episodes of every process (in rank order)."""
        if not self.memory_on:
            return {}
        crit_text = crit.critique_text_per_row(len(batch.rows)) if crit is not None else [None] * len(batch.rows)
        parts = dist.gather_objects((batch.rows, batch.texts, batch.correct, crit_text))
        metrics = {}
        if self.is_main:
            rows, texts, correct, crits = ([x for p in parts for x in p[i]] for i in range(4))
            metrics = self.memory_hook.update(rows, texts, correct, crits, self.step + 1, batch.group_size)
        return dist.broadcast_object(metrics)

    def _log_rollouts(self, batch: RolloutBatch, plan: AdvantagePlan, crit: CritiqueResult | None) -> None:
        n = batch.group_size
        adv = plan.advantages[:, :n].reshape(-1)
        crit_at: dict[int, int] = {i: j for j, i in enumerate(crit.idx)} if crit else {}
        ref_at: dict[int, int] = {i: j for j, i in enumerate(crit.ref_src)} if crit else {}
        # log the first rows, plus critiqued ones so refinements are visible
        chosen = list(range(min(self.cfg.log_rollouts, len(batch.completions))))
        chosen += [i for i in list(crit_at)[: self.cfg.log_rollouts] if i not in chosen]
        names = self.reward_names
        out = []
        for i in chosen:
            row = {
                "step": self.step + 1,
                "prompt": batch.rows[i]["prompt"],
                "answer": batch.rows[i]["answer"],
                "completion": batch.completions[i].text,
                "rewards": dict(zip(names, [None if math.isnan(v) else v for v in batch.rewards[i].tolist()],
                                    strict=True)),
                "advantage": adv[i].item(),
            }
            if self.world > 1:
                row["rank"] = self.rank
            if i in crit_at:
                row["critique"] = crit.critiques[crit_at[i]].text
            if i in ref_at:
                j = ref_at[i]
                row["refinement"] = crit.ref_completions[j].text
                row["refinement_rewards"] = dict(zip(
                    names, [None if math.isnan(v) else v for v in crit.ref_rewards[j].tolist()], strict=True))
            out.append(row)
        for part in dist.gather_objects(out):
            if self.is_main:
                for row in part:
                    self.rollout_log.write(row)

    # ------------------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------------------

    def _save(self) -> None:
        """Checkpoint written by the main process alone (every process's RNG state gathered into it)."""
        self.summary["wall_seconds_before_resume"] = self._wall_prior + time.perf_counter() - self._t_start
        rng_states = dist.gather_objects(ckpt.rng_state())
        refine_states = dist.gather_objects(self.rng.getstate())
        critic_states = dist.gather_objects(_critic_counts(self.critic))
        if self.is_main:
            state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "sampler": self.sampler.state_dict(), "summary": self.summary, "refine_rng": refine_states,
                     "rng_per_rank": rng_states, "world_size": self.world, "critic_stats": critic_states,
                     "selection": self._selection.to_dict(), "phases_done": self._phases_done,
                     "phase_samplers": {k: v.state_dict() for k, v in self._phase_samplers.items()}}
            if self._ema_teacher is not None:
                state["distill_teacher_ema"] = self._ema_teacher.state_dict()
            extra = {"memory.sqlite": self.memory_hook.snapshot} if self.memory_hook is not None else None
            if self.episodes is not None:
                extra = self.episodes.checkpoint_files()
            ckpt.save_checkpoint(self.out / "checkpoints", self.step, self._policy(), self.tokenizer, state,
                                 keep=self.cfg.keep_checkpoints, extra_files=extra)
        self.accelerator.wait_for_everyone()

    def _restore(self, path: Path) -> None:
        state = ckpt.load_trainer_state(path)
        saved_world = state.get("world_size", 1)
        if saved_world != self.world:
            raise UserError(f"checkpoint {path} was written by {saved_world} process(es); resume it with the same "
                            f"number of processes (now {self.world})")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self._selection = SelectionState.from_dict(state.get("selection"))
        leading_sft = next((i for i, ph in enumerate(self.phases) if ph.kind != "sft"), len(self.phases))
        self._phases_done = state.get("phases_done", leading_sft)  # older checkpoints: the warm-up was done
        for key, sampler_state in state.get("phase_samplers", {}).items():
            if key in self._phase_samplers:
                self._phase_samplers[key].load_state_dict(sampler_state)
        if self._ema_teacher is not None:
            if "distill_teacher_ema" not in state:
                raise UserError(f"checkpoint {path} holds no EMA teacher (it was written with distill_teacher: "
                                "current); resume with the same distill_teacher")
            self._ema_teacher.load_state_dict(state["distill_teacher_ema"])
        self.summary = state["summary"]
        self.step = state["step"]
        refine = state["refine_rng"]
        self.rng.setstate(refine[self.rank] if isinstance(refine, list) else refine)
        self._wall_prior = self.summary.get("wall_seconds_before_resume", 0.0)
        _restore_critic_counts(self.critic, (state.get("critic_stats") or [None] * self.world)[self.rank])
        self._critic_errors_seen = float(_critic_counts(self.critic).get("errors", 0))
        ckpt.set_rng_state(state["rng_per_rank"][self.rank] if "rng_per_rank" in state else state["rng"])

    # ------------------------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------------------------

    def _check_critic(self, metrics: dict[str, Any]) -> None:
        """Warn about failed critic requests (they fell back to rule critiques) and stop the run once more than
        ``critic.max_failure_share`` of them failed. ``critic/*`` counters are summed over processes, so every
        rank takes the same decision."""
        requests, errors = metrics.get("critic/requests") or 0.0, metrics.get("critic/errors") or 0.0
        where = getattr(self.critic, "url", None) or self.cfg.critic.model or self.cfg.critic.backend
        last = getattr(self.critic, "last_error", None)
        detail = f"; last error: {last}" if last else ""
        # warn at the first failures, then (while more fail) every 10 steps and at the last step
        if errors > self._critic_errors_seen and (self._critic_errors_seen == 0 or self.step % 10 == 0
                                                   or self.step >= self.cfg.max_steps):
            if self.is_main:
                console.print(f"[bold red]warning: critic at {where}: {errors:.0f} of {requests:.0f} requests failed "
                              f"so far (step {self.step}{detail}); they fell back to rule critiques[/]", soft_wrap=True)
            self._critic_errors_seen = errors
        share = self.cfg.critic.max_failure_share
        if share < 1.0 and requests >= CRITIC_MIN_REQUESTS and errors > share * requests:
            raise UserError(f"critic at {where} failed {errors:.0f} of {requests:.0f} requests by step {self.step} "
                            f"(more than critic.max_failure_share = {share:g}){detail}; check critic.base_url, "
                            "critic.model and the key in $" + self.cfg.critic.api_key_env + ", or raise "
                            "critic.max_failure_share")

    def _write_metrics(self, row: dict[str, Any]) -> None:
        if self.is_main:
            self.metrics_log.write(row)
        if self.trackers:  # the same scalars under the same names and step
            self.accelerator.log(scalars(row), step=int(row["step"]))

    def _run_totals(self) -> dict[str, Any]:
        """Critique and memory totals over the whole run (from metrics.jsonl, so resumed runs count too)."""
        rows = [r for r in read_jsonl(self.out / "metrics.jsonl") if "loss/total" in r]
        out: dict[str, Any] = {}
        if any("critique/refinements" in r for r in rows):
            ref = sum(r.get("critique/refinements", 0) for r in rows)
            ok = sum((r.get("critique/refine_success_rate") or 0) * r.get("critique/refinements", 0) for r in rows)
            out["critique_refinements"] = ref
            out["critique_refine_success_rate"] = ok / ref if ref else None
            out["critique_groups_rescued"] = sum(r.get("critique/groups_rescued", 0) for r in rows)
            out["critique_all_wrong_groups"] = sum(r.get("critique/all_wrong_groups", 0) for r in rows)
        if self.memory is not None:
            st = self.memory.stats()
            out["memory_bank"] = st["path"]
            out["memory_demonstrations"] = st["demonstrations"]["count"]
            out["memory_lessons"] = st["lessons"]["count"]
        return out
