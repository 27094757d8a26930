"""The training loop: SFT warm-up, then GRPO / Critique-GRPO steps, evaluation, checkpoints.

Read top to bottom: ``train()`` -> ``_setup`` -> ``_warmup`` -> loop of ``_step`` -> ``_finish``.
One step = sample groups, score, (critique + refine), advantages, clipped policy-gradient update.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from critique_rl.algos import (
    aggregate_loss,
    aggregate_rewards,
    apply_gates,
    entropy_from_logits,
    kl_k3,
    ppo_clip_loss,
)
from critique_rl.config import TrainConfig
from critique_rl.data import load_rows
from critique_rl.errors import UserError
from critique_rl.models import (
    build_tiny_model,
    build_tiny_tokenizer,
    format_prompt,
    load_policy,
    wants_chat_template,
)
from critique_rl.rewards import build_gates, build_reward_funcs, evaluate_gates, func_name, score_rewards
from critique_rl.rollout import HFGenerator, SamplingParams
from critique_rl.tasks import Task, get_task, load_callable
from critique_rl.train import checkpoint as ckpt
from critique_rl.train.batching import TokenBatch, completion_logprobs, pack
from critique_rl.train.evaluate import evaluate
from critique_rl.train.metrics import JsonlWriter, plot_curves
from critique_rl.train.sampler import PromptSampler
from critique_rl.train.sft import sft_warmup

EVAL_SEED = 12345  # the held-out set does not depend on the run seed, so seeds compare on the same problems
console = Console(stderr=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class CritiqueGRPOTrainer:
    """GRPO with optional critiques, refinements, directive distillation and memory.

    Args:
        model: ``"tiny"``, a local model directory, or an already-loaded ``PreTrainedModel``.
        train_dataset: rows (list of dicts or a ``datasets.Dataset``) with ``prompt`` and ``answer``;
            None = the task's generator.
        reward_funcs: names from the registry, ``pkg.module:fn`` specs, or callables.
        critic: a :class:`critique_rl.critics.Critic`, or None to build one from ``args.critic``.
        memory: a :class:`critique_rl.memory.MemoryBank`, or None to build one from ``args.memory``.
        args: the run config.
    """

    def __init__(
        self,
        model: Any = None,
        train_dataset: Any = None,
        reward_funcs: list[Any] | None = None,
        critic: Any = None,
        memory: Any = None,
        args: TrainConfig | None = None,
        tokenizer: Any = None,
        eval_dataset: Any = None,
    ) -> None:
        self.cfg = args or TrainConfig()
        self._model_arg = model if model is not None else self.cfg.model
        self._tokenizer_arg = tokenizer
        self._train_arg = train_dataset
        self._eval_arg = eval_dataset
        self._reward_arg = reward_funcs
        self.critic = critic
        self.memory = memory
        self.out = Path(self.cfg.output_dir)
        self.step = 0
        self.summary: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------------------------
    def _setup(self, resume: bool) -> ckpt.Path | None:
        cfg = self.cfg
        seed_everything(cfg.seed)
        self.task: Task = get_task(cfg.task)
        verify = load_callable(cfg.verifier) if cfg.verifier else self.task.verify
        self.verify = verify
        self.train_rows = self._rows(self._train_arg, cfg.train_file, "train", cfg.sft_examples)
        self.eval_rows = self._rows(self._eval_arg, cfg.eval_file, "eval", cfg.eval_n)[: cfg.eval_n]
        self.out.mkdir(parents=True, exist_ok=True)
        resume_from = ckpt.latest_checkpoint(self.out / "checkpoints") if resume else None
        if resume and resume_from is None:
            console.print(f"[yellow]--resume: no checkpoint under {self.out / 'checkpoints'}; starting fresh[/]")

        self.accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            cpu=(cfg.device == "cpu") or (cfg.device == "auto" and not torch.cuda.is_available()),
        )
        self.model, self.tokenizer = self._load_model(resume_from)
        self.use_chat = wants_chat_template(self.tokenizer, cfg.use_chat_template)
        self.max_new_tokens = cfg.max_new_tokens or self.task.max_new_tokens
        funcs = self._reward_arg if self._reward_arg is not None else cfg.reward_funcs
        self.reward_funcs = [
            f if callable(f) else build_reward_funcs([f], self.task, cfg.reward_kwargs)[0] for f in funcs
        ]
        self.reward_names = [func_name(f) for f in self.reward_funcs]
        self.gates = build_gates(cfg.gates, self.task, cfg.gate_kwargs)
        weights = cfg.reward_weights or [1.0] * len(self.reward_funcs)
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)

        self.sampler = PromptSampler(self.train_rows, cfg.seed)
        cfg.save_yaml(self.out / "config.yaml")
        return resume_from

    def _rows(self, given: Any, path: str | None, split: str, n: int) -> list[dict[str, Any]]:
        if given is not None:
            rows = [dict(r) for r in given]
            if rows and ("prompt" not in rows[0] or "answer" not in rows[0]):
                raise UserError(f"{split} dataset: rows need columns 'prompt' and 'answer'; got {sorted(rows[0])}")
            return rows
        if path:
            return load_rows(path, field=f"{split}_file")
        seed = EVAL_SEED if split == "eval" else self.cfg.seed
        return self.task.make_examples(split, n, seed)

    def _load_model(self, resume_from: Path | None):
        cfg = self.cfg
        if resume_from is not None:
            return load_policy(resume_from / "model", device=str(self.accelerator.device.type))
        if not isinstance(self._model_arg, str):
            if self._tokenizer_arg is None:
                raise UserError("pass tokenizer= together with a loaded model object")
            return self._model_arg.to(self.accelerator.device), self._tokenizer_arg
        if self._model_arg == "tiny":
            texts = [r["prompt"] + self.task.sft_completion(r) for r in self.train_rows[:4000]]
            tok = build_tiny_tokenizer(texts, cfg.tiny_vocab_size)
            model = build_tiny_model(tok, cfg.tiny_hidden_size, cfg.tiny_layers, cfg.tiny_heads, seed=cfg.seed)
            return model.to(self.accelerator.device), tok
        return load_policy(self._model_arg, device=str(self.accelerator.device.type))

    def prompt_text(self, row: dict[str, Any], context: str | None = None) -> str:
        text = row["prompt"] if not context else f"{context}\n{row['prompt']}"
        return format_prompt(self.tokenizer, text, self.use_chat)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # ------------------------------------------------------------------------------------------------------
    # phases
    # ------------------------------------------------------------------------------------------------------
    def _warmup(self, progress: Progress | None) -> None:
        cfg = self.cfg
        if cfg.sft_steps > 0:
            task_id = progress.add_task("SFT warm-up", total=cfg.sft_steps) if progress else None
            t0 = time.perf_counter()
            losses = sft_warmup(
                self.model, self.tokenizer, self.train_rows,
                prompt_fn=self.prompt_text, completion_fn=self._demonstration,
                steps=cfg.sft_steps, batch_size=cfg.sft_batch_size, lr=cfg.sft_learning_rate, seed=cfg.seed,
                on_step=(lambda s, loss: progress.update(task_id, advance=1, description=f"SFT loss {loss:.3f}"))
                if progress else None,
            )
            self.summary["sft_final_loss"] = losses[-1]
            self.summary["sft_seconds"] = time.perf_counter() - t0
        self.summary["eval_accuracy_before_rl"] = self._evaluate()["accuracy"]

    def _demonstration(self, row: dict[str, Any]) -> str:
        """SFT target: the task's completion, or its typical mistake at ``sft_mistake_rate`` (seeded per row)."""
        rate, mistake = self.cfg.sft_mistake_rate, self.task.mistake
        if rate > 0 and mistake is not None:
            wrong = mistake(row)
            if wrong is not None and random.Random(f"{self.cfg.seed}:{row['prompt']}").random() < rate:
                return wrong
        return self.task.sft_completion(row)

    def _evaluate(self) -> dict[str, float]:
        gen = HFGenerator(self.accelerator.unwrap_model(self.model), self.tokenizer, batch_size=cfg_bs(self.cfg))
        return evaluate(gen, self.eval_rows, self.prompt_text, self.verify, self.max_new_tokens,
                        batch_size=self.cfg.eval_batch_size)

    def _build_optim(self) -> None:
        cfg = self.cfg
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        total = max(1, cfg.max_steps)

        def schedule(s: int) -> float:
            if cfg.warmup_steps and s < cfg.warmup_steps:
                return (s + 1) / cfg.warmup_steps
            frac = (s - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
            if cfg.lr_scheduler == "linear":
                return max(0.0, 1 - frac)
            if cfg.lr_scheduler == "cosine":
                return 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
            return 1.0

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(self.model, self.optimizer, self.scheduler)
        self.ref_model = None
        if cfg.kl_beta > 0:
            self.ref_model = copy.deepcopy(self.accelerator.unwrap_model(self.model)).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
        self.generator = HFGenerator(self.accelerator.unwrap_model(self.model), self.tokenizer,
                                     batch_size=cfg_bs(cfg))

    # ------------------------------------------------------------------------------------------------------
    # one RL step
    # ------------------------------------------------------------------------------------------------------
    def _sample_groups(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Sample n completions per prompt and score them. Returns flat lists of length B*n."""
        cfg = self.cfg
        prompts = [self.prompt_text(r) for r in rows]
        params = SamplingParams(n=cfg.num_generations, temperature=cfg.temperature, top_p=cfg.top_p,
                                max_new_tokens=self.max_new_tokens)
        groups = self.generator.generate(prompts, params)
        flat_rows = [r for r in rows for _ in range(cfg.num_generations)]
        completions = [c for g in groups for c in g]
        return {"rows": flat_rows, "prompts": [p for p in prompts for _ in range(cfg.num_generations)],
                "completions": completions}

    def _columns(self, rows: list[dict[str, Any]], completions: list[Any]) -> dict[str, list[Any]]:
        columns = {k: [r.get(k) for r in rows] for k in rows[0] if k != "prompt"}
        columns["completion_lengths"] = [len(c.token_ids) for c in completions]
        columns["truncated"] = [not c.finished for c in completions]
        return columns

    def _score(self, rows: list[dict[str, Any]], completions: list[Any]) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Reward matrix ``[N, K]`` (NaN = not applicable), gate pass mask ``[N]`` and gate pass rates."""
        prompts, texts = [r["prompt"] for r in rows], [c.text for c in completions]
        columns = self._columns(rows, completions)
        R = score_rewards(self.reward_funcs, prompts, texts, columns)
        if not self.gates:
            return R, torch.ones(len(rows), dtype=torch.bool), {}
        passed, rates = evaluate_gates(self.gates, prompts, texts, columns)
        return R, passed, rates

    def _advantages(self, R: torch.Tensor, passed: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Per-sample advantages ``[N]`` and the sample mask ``[N]`` from rewards ``[N, K]``.

        Gated-out samples and dropped groups get mask False (no gradient at all).
        """
        cfg = self.cfg
        G = R.shape[0] // group_size
        mask, kept = apply_gates(torch.ones(G, group_size, dtype=torch.bool), passed.view(G, group_size))
        adv, diag = aggregate_rewards(
            cfg.reward_aggregator, R.view(G, group_size, -1), self.reward_weights, mask,
            estimator=cfg.advantage_estimator, w_lambda=cfg.w_lambda, reward_threshold=cfg.reward_threshold,
        )
        diag["groups_kept"] = kept.float().mean().item()
        return adv.reshape(-1), mask.reshape(-1), diag

    def _policy_update(self, batch: TokenBatch, advantages: torch.Tensor) -> dict[str, float]:
        """Clipped policy-gradient update over mini-batches with gradient accumulation.

        Samples whose ``completion_mask`` row is all zero (gated out) contribute no gradient.
        """
        cfg, acc = self.cfg, self.accelerator
        N = batch.input_ids.shape[0]
        batch = batch.to(acc.device)
        advantages = advantages.to(acc.device)
        num_tokens = float(batch.completion_mask.sum().clamp_min(1))
        norm_const = float(self.max_new_tokens)
        old_logp = ref_logp = None
        if cfg.num_iterations > 1 or self.ref_model is not None:
            with torch.no_grad():
                chunks_old, chunks_ref = [], []
                for s in range(0, N, cfg.mini_batch_size):
                    mb = batch.select(slice(s, s + cfg.mini_batch_size))
                    if cfg.num_iterations > 1:
                        chunks_old.append(completion_logprobs(self.model, mb, cfg.temperature)[0])
                    if self.ref_model is not None:
                        chunks_ref.append(completion_logprobs(self.ref_model, mb, cfg.temperature)[0])
                old_logp = torch.cat(chunks_old) if chunks_old else None
                ref_logp = torch.cat(chunks_ref) if chunks_ref else None
        stats: dict[str, float] = {"loss/policy": 0.0, "loss/kl": 0.0, "loss/entropy": 0.0, "loss/total": 0.0,
                                   "clip_frac": 0.0, "entropy": 0.0, "kl": 0.0, "grad_norm": 0.0}
        self.model.train()
        n_updates = 0
        for _ in range(cfg.num_iterations):
            starts = list(range(0, N, cfg.mini_batch_size))
            for j, s in enumerate(starts):
                sl = slice(s, s + cfg.mini_batch_size)
                mb = batch.select(sl)
                mask = mb.completion_mask.float()
                sync = acc.no_sync(self.model) if j < len(starts) - 1 else nullcontext()
                with sync, acc.autocast():
                    logp, logits = completion_logprobs(self.model, mb, cfg.temperature, with_logits=True)
                    old = old_logp[sl] if old_logp is not None else logp.detach()
                    pg, clipped = ppo_clip_loss(logp, old, advantages[sl], cfg.clip_eps_low, cfg.clip_eps_high)
                    ent = entropy_from_logits(logits) if cfg.entropy_coef > 0 else None
                    per_token = pg
                    if ref_logp is not None:
                        kl = kl_k3(logp, ref_logp[sl])
                        per_token = per_token + cfg.kl_beta * kl
                    if ent is not None:
                        per_token = per_token - cfg.entropy_coef * ent
                    agg = dict(mode=cfg.loss_aggregation, num_seqs=N, num_tokens=num_tokens, norm_constant=norm_const)
                    loss = aggregate_loss(per_token, mask, **agg)
                acc.backward(loss)
                with torch.no_grad():
                    if ent is None:
                        ent = entropy_from_logits(logits.detach())
                    stats["loss/total"] += loss.item()
                    stats["loss/policy"] += aggregate_loss(pg, mask, **agg).item()
                    stats["clip_frac"] += ((clipped * mask).sum() / num_tokens).item()
                    stats["entropy"] += ((ent * mask).sum() / num_tokens).item()
                    if ref_logp is not None:
                        stats["kl"] += ((kl * mask).sum() / num_tokens).item()
                        stats["loss/kl"] += cfg.kl_beta * aggregate_loss(kl, mask, **agg).item()
                    if cfg.entropy_coef > 0:
                        stats["loss/entropy"] -= cfg.entropy_coef * aggregate_loss(ent, mask, **agg).item()
            grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step() if n_updates == 0 else None
            self.optimizer.zero_grad(set_to_none=True)
            stats["grad_norm"] += float(grad_norm)
            n_updates += 1
        for k in ("loss/policy", "loss/kl", "loss/entropy", "loss/total", "clip_frac", "entropy", "kl", "grad_norm"):
            stats[k] /= n_updates
        stats["lr"] = self.scheduler.get_last_lr()[0]
        return stats

    def _step(self) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.perf_counter()
        rows = self.sampler.next_batch(cfg.prompts_per_step)
        sampled = self._sample_groups(rows)
        t1 = time.perf_counter()
        R, passed, gate_rates = self._score(sampled["rows"], sampled["completions"])
        adv, sample_mask, diag = self._advantages(R, passed, cfg.num_generations)
        t2 = time.perf_counter()
        batch = pack([self._encode(p) for p in sampled["prompts"]],
                     [c.token_ids for c in sampled["completions"]], self.tokenizer.pad_token_id)
        batch.completion_mask *= sample_mask.unsqueeze(-1).to(batch.completion_mask.dtype)
        stats = self._policy_update(batch, adv)
        t3 = time.perf_counter()

        metrics: dict[str, Any] = {"step": self.step + 1}
        for k, name in enumerate(self.reward_names):
            col = R[:, k]
            valid = col[~torch.isnan(col)]
            metrics[f"reward/{name}/mean"] = valid.mean().item() if len(valid) else None
            metrics[f"reward/{name}/std"] = valid.std(unbiased=False).item() if len(valid) else None
        for k, name in enumerate(self.reward_names):
            metrics[f"reward/{name}/weight"] = float(diag["effective_weight"][k])
        for gname, rate in gate_rates.items():
            metrics[f"gate/{gname}/pass_rate"] = rate
        metrics["gate/groups_kept"] = diag["groups_kept"]
        metrics["reward/mean"] = (torch.nan_to_num(R, nan=0.0) * self.reward_weights).sum(-1).mean().item()
        correct = torch.tensor([float(self.verify(c.text, r["answer"]))
                                for c, r in zip(sampled["completions"], sampled["rows"], strict=True)])
        metrics["train/accuracy"] = correct.mean().item()
        grouped = correct.view(-1, cfg.num_generations)
        metrics["train/all_wrong_groups"] = (grouped.sum(-1) == 0).float().mean().item()
        metrics["train/all_right_groups"] = (grouped.sum(-1) == cfg.num_generations).float().mean().item()
        metrics["completions/mean_length"] = float(np.mean([len(c.token_ids) for c in sampled["completions"]]))
        metrics["completions/finished"] = float(np.mean([c.finished for c in sampled["completions"]]))
        metrics.update(stats)
        metrics.update({"time/generate": t1 - t0, "time/score": t2 - t1, "time/train": t3 - t2, "time/step": t3 - t0})
        self._log_rollouts(sampled, R, adv)
        return metrics

    def _log_rollouts(self, sampled: dict[str, Any], R: torch.Tensor, adv: torch.Tensor) -> None:
        for i in range(min(self.cfg.log_rollouts, len(sampled["completions"]))):
            self.rollout_log.write({
                "step": self.step + 1,
                "prompt": sampled["rows"][i]["prompt"],
                "answer": sampled["rows"][i]["answer"],
                "completion": sampled["completions"][i].text,
                "rewards": dict(zip(self.reward_names, [None if math.isnan(v) else v for v in R[i].tolist()],
                                    strict=True)),
                "advantage": adv[i].item(),
            })

    # ------------------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------------------
    def _save(self) -> None:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "sampler": self.sampler.state_dict(), "summary": self.summary}
        ckpt.save_checkpoint(self.out / "checkpoints", self.step, self.accelerator.unwrap_model(self.model),
                             self.tokenizer, state, keep=self.cfg.keep_checkpoints)

    def _restore(self, path: Path) -> None:
        state = ckpt.load_trainer_state(path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.summary = state["summary"]
        self.step = state["step"]
        ckpt.set_rng_state(state["rng"])

    # ------------------------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------------------------
    def train(self, resume: bool = False) -> dict[str, Any]:
        """Run SFT warm-up (unless resuming), RL for ``max_steps``, and write the run directory."""
        t_start = time.perf_counter()
        resume_from = self._setup(resume)
        self.metrics_log = JsonlWriter(self.out / "metrics.jsonl")
        self.rollout_log = JsonlWriter(self.out / "rollouts.jsonl")
        progress = _progress() if self.cfg.progress else None
        with progress or nullcontext():
            if resume_from is None:
                self._warmup(progress)
                self.metrics_log.write({"step": 0, "eval/accuracy": self.summary["eval_accuracy_before_rl"]})
            self._build_optim()
            if resume_from is not None:
                self._restore(resume_from)
                self.metrics_log.truncate_after_step(self.step)
                self.rollout_log.truncate_after_step(self.step)
                console.print(f"resumed from {resume_from} at step {self.step}")
            task_id = progress.add_task("RL", total=self.cfg.max_steps, completed=self.step) if progress else None
            while self.step < self.cfg.max_steps:
                metrics = self._step()
                self.step += 1
                if self.cfg.eval_every and self.step % self.cfg.eval_every == 0 and self.step < self.cfg.max_steps:
                    metrics["eval/accuracy"] = self._evaluate()["accuracy"]
                self.metrics_log.write(metrics)
                if progress:
                    progress.update(task_id, advance=1, description=(
                        f"RL acc {metrics['train/accuracy']:.2f} loss {metrics['loss/total']:+.3f}"))
                if self.step % self.cfg.checkpoint_every == 0:
                    self._save()
        return self._finish(t_start)

    def _finish(self, t_start: float) -> dict[str, Any]:
        final = self._evaluate()
        self.summary.update({
            "eval_accuracy_after_rl": final["accuracy"],
            "eval_mean_length_after_rl": final["mean_length"],
            "eval_n": len(self.eval_rows),
            "steps": self.step,
            "task": self.cfg.task,
            "wall_seconds": self.summary.get("wall_seconds_before_resume", 0.0) + time.perf_counter() - t_start,
        })
        self.metrics_log.write({"step": self.step, "eval/accuracy": final["accuracy"], "final": True})
        self.metrics_log.close()
        self.rollout_log.close()
        if self.step % self.cfg.checkpoint_every != 0 and self.step > 0:
            self._save()
        final_dir = self.out / "final"
        self.accelerator.unwrap_model(self.model).save_pretrained(final_dir)
        self.tokenizer.save_pretrained(final_dir)
        plot_curves(self.out / "metrics.jsonl", self.out / "curves.png")
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=2))
        return self.summary


def cfg_bs(cfg: TrainConfig) -> int:
    return max(cfg.generation_batch_size, cfg.eval_batch_size)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, transient=False)


def summary_table(summary: dict[str, Any]) -> Table:
    t = Table(title=f"critique-rl: {summary.get('task', '')} ({summary.get('eval_n', 0)} held-out problems)")
    t.add_column("stage")
    t.add_column("eval accuracy", justify="right")
    before, after = summary.get("eval_accuracy_before_rl"), summary.get("eval_accuracy_after_rl")
    t.add_row("after SFT warm-up (before RL)", f"{before:.1%}" if before is not None else "-")
    t.add_row(f"after RL ({summary.get('steps', 0)} steps)", f"{after:.1%}" if after is not None else "-")
    if before is not None and after is not None:
        t.add_row("RL gain", f"{(after - before) * 100:+.1f} points")
    return t
