"""The training loop: SFT warm-up, then GRPO / Critique-GRPO steps, evaluation, checkpoints.

Read top to bottom: ``train()`` -> ``_setup`` -> ``_warmup`` -> loop of ``_step`` -> ``_finish``.
One step = sample groups, score, (critique + refine), advantages, clipped policy-gradient update.
"""

from __future__ import annotations

import copy
import dataclasses
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

from critique_rl.algos import aggregate_rewards, apply_gates, sampled_token_advantage
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
from critique_rl.rewards.builtin import parse_confidence
from critique_rl.rollout import HFGenerator, SamplingParams
from critique_rl.tasks import Task, get_task, load_callable
from critique_rl.train import checkpoint as ckpt
from critique_rl.train.batching import pack
from critique_rl.train.critique_step import (
    choose_refinements,
    critique_requests,
    refine_text,
    refinement_demos,
    select_for_critique,
)
from critique_rl.train.evaluate import evaluate
from critique_rl.train.metrics import JsonlWriter, plot_curves, read_jsonl
from critique_rl.train.sampler import PromptSampler
from critique_rl.train.sft import sft_warmup
from critique_rl.train.update import UpdateBatch, policy_update, teacher_scores

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
        if not resume and ckpt.latest_checkpoint(self.out / "checkpoints") is not None:
            raise UserError(f"output_dir '{self.out}' already holds checkpoints of an earlier run; pass --resume to "
                            "continue it, or choose another --output-dir (or delete the folder)")
        if resume_from is None:  # a fresh run owns its logs
            for name in ("metrics.jsonl", "rollouts.jsonl"):
                (self.out / name).unlink(missing_ok=True)

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
        self.rng = random.Random(cfg.seed + 1)  # refinement choice; checkpointed
        if self.critic is None and cfg.critic.backend != "none" and cfg.critique_on != "none":
            from critique_rl.critics import build_critic

            self.critic = build_critic(cfg.critic, policy=self.model, tokenizer=self.tokenizer, output_dir=self.out)
        if cfg.critique_on == "none":
            self.critic = None
        self.memory_hook = self._build_memory(resume_from)
        cfg.save_yaml(self.out / "config.yaml")
        return resume_from

    def _build_memory(self, resume_from: Path | None) -> Any:
        cfg = self.cfg
        if self.memory is None and not cfg.memory.enabled:
            return None
        from critique_rl.memory import MemoryBank
        from critique_rl.train.memory_hook import MemoryHook

        bank_path = Path(cfg.memory.bank_path or self.out / "memory.sqlite")
        given = self.memory is not None
        if resume_from is not None and not given:  # bank and model go back to the same step
            MemoryHook.restore(resume_from / "memory.sqlite", bank_path)
        if not given:
            self.memory = MemoryBank(bank_path, config=cfg.memory, critic=self.critic)
        mem_cfg = cfg.memory if cfg.memory.enabled else dataclasses.replace(cfg.memory, enabled=True)  # memory= given
        hook = MemoryHook(self.memory, mem_cfg, self.task.name, run_name=self.out.name, critic=self.critic)
        if resume_from is not None and given:
            hook.restore_open(resume_from)
        return hook

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
            texts += [p + c for p, c in refinement_demos(self.task, self.train_rows[:500], 1.0, cfg.seed,
                                                         self.task.sft_completion, cfg.critic.template_dir)]
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
            pairs = [(self.prompt_text(r), self._demonstration(r)) for r in self.train_rows]
            if cfg.sft_refine_fraction > 0:
                pairs += [(self.prompt_text({"prompt": p}), c) for p, c in refinement_demos(
                    self.task, self.train_rows, cfg.sft_refine_fraction, cfg.seed, self.task.sft_completion,
                    cfg.critic.template_dir)]
            losses = sft_warmup(
                self.model, self.tokenizer, pairs,
                steps=cfg.sft_steps, batch_size=cfg.sft_batch_size, lr=cfg.sft_learning_rate, seed=cfg.seed,
                on_step=(lambda s, loss: progress.update(task_id, advance=1, description=f"SFT loss {loss:.3f}"))
                if progress else None,
            )
            self.summary["sft_final_loss"] = losses[-1]
            self.summary["sft_seconds"] = time.perf_counter() - t0
        before = self._evaluate()
        self.summary["eval_accuracy_before_rl"] = before["accuracy"]
        if "ece" in before:
            self.summary["eval_ece_before_rl"] = before["ece"]
        self._eval_row0 = _eval_metrics(before)

    def _demonstration(self, row: dict[str, Any]) -> str:
        """SFT target: the task's completion, or its typical mistake at ``sft_mistake_rate`` (seeded per row)."""
        rate, mistake = self.cfg.sft_mistake_rate, self.task.mistake
        if rate > 0 and mistake is not None:
            wrong = mistake(row)
            if wrong is not None and random.Random(f"{self.cfg.seed}:{row['prompt']}").random() < rate:
                return wrong
        return self.task.sft_completion(row)

    def _evaluate(self) -> dict[str, Any]:
        """Greedy held-out accuracy; with a ``brier`` reward in use, also calibration (ECE, Brier score, AUROC)."""
        gen = HFGenerator(self.accelerator.unwrap_model(self.model), self.tokenizer, batch_size=cfg_bs(self.cfg))
        conf = parse_confidence if "brier" in self.reward_names else None
        return evaluate(gen, self.eval_rows, self.prompt_text, self.verify, self.max_new_tokens,
                        batch_size=self.cfg.eval_batch_size, confidence_fn=conf)

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
    def _sample_groups(self, rows: list[dict[str, Any]], contexts: list[str] | None) -> dict[str, Any]:
        """Sample n completions per prompt. Returns flat lists of length B*n (groups contiguous)."""
        cfg = self.cfg
        prompts = [self.prompt_text(r, contexts[i] if contexts else None) for i, r in enumerate(rows)]
        params = SamplingParams(n=cfg.num_generations, temperature=cfg.temperature, top_p=cfg.top_p,
                                max_new_tokens=self.max_new_tokens)
        groups = self.generator.generate(prompts, params)
        n = cfg.num_generations
        return {"rows": [r for r in rows for _ in range(n)], "prompts": [p for p in prompts for _ in range(n)],
                "completions": [c for g in groups for c in g]}

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

    def _critique_and_refine(self, sampled: dict[str, Any], correct: list[bool]) -> dict[str, Any] | None:
        """Critique the selected responses, sample one refinement each, score them (Critique-GRPO)."""
        cfg = self.cfg
        n = cfg.num_generations
        mode = "all" if cfg.distill_on == "all" and cfg.distill_weight > 0 else cfg.critique_on
        idx = select_for_critique(correct, n, mode)
        if not idx:
            return None
        texts = [c.text for c in sampled["completions"]]
        requests = critique_requests(self.task, sampled["rows"], texts, correct, idx)
        critiques = self.critic.critique(requests)
        teacher_prompts = [
            self.prompt_text({"prompt": refine_text(sampled["rows"][i]["prompt"], texts[i], c.text,
                                                    cfg.critic.template_dir)})
            for i, c in zip(idx, critiques, strict=True)
        ]
        refine_idx = idx if mode == cfg.critique_on else select_for_critique(correct, n, cfg.critique_on)
        pos = {i: j for j, i in enumerate(idx)}
        ref_src = [i for i in refine_idx if i in pos]
        outs = self.generator.generate([teacher_prompts[pos[i]] for i in ref_src],
                                       SamplingParams(n=1, temperature=cfg.temperature, top_p=cfg.top_p,
                                                      max_new_tokens=self.max_new_tokens)) if ref_src else []
        ref_completions = [o[0] for o in outs]
        ref_rows = [sampled["rows"][i] for i in ref_src]
        if ref_src:
            R_ref, passed_ref, _ = self._score(ref_rows, ref_completions)
        else:
            R_ref, passed_ref = torch.zeros(0, len(self.reward_funcs)), torch.zeros(0, dtype=torch.bool)
        ref_correct = [bool(self.verify(c.text, r["answer"])) for c, r in zip(ref_completions, ref_rows, strict=True)]
        return {"idx": idx, "critiques": critiques, "teacher_prompts": teacher_prompts, "ref_src": ref_src,
                "ref_completions": ref_completions, "R_ref": R_ref, "passed_ref": passed_ref,
                "ref_correct": ref_correct}

    def _mixed_group(self, R: torch.Tensor, passed: torch.Tensor, crit: dict[str, Any] | None):
        """Rewards ``[G, n+k, K]`` and pass mask ``[G, n+k]`` of initial samples plus kept refinements, and
        the flat refinement indices kept (into ``crit['ref_src']``) in slot order."""
        cfg = self.cfg
        n, K = cfg.num_generations, R.shape[-1]
        G = R.shape[0] // n
        k = cfg.refinements_per_group if crit is not None else 0
        R_mix = torch.full((G, n + k, K), float("nan"))
        R_mix[:, :n] = R.view(G, n, K)
        passed_mix = torch.zeros(G, n + k, dtype=torch.bool)
        passed_mix[:, :n] = passed.view(G, n)
        kept: list[tuple[int, int, int]] = []  # (group, slot in the mixed group, refinement index)
        if k:
            group_of = [i // n for i in crit["ref_src"]]
            chosen = choose_refinements(group_of, crit["ref_correct"], k, G, self.rng)
            for g, js in enumerate(chosen):
                for slot, j in enumerate(js):
                    R_mix[g, n + slot] = crit["R_ref"][j]
                    passed_mix[g, n + slot] = bool(crit["passed_ref"][j])
                    kept.append((g, n + slot, j))
        return R_mix, passed_mix, kept

    def _advantages(self, R_mix: torch.Tensor, passed_mix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Advantages and sample mask ``[G, n+k]``; gated-out samples and dropped groups get mask False."""
        cfg = self.cfg
        mask, kept = apply_gates(torch.ones_like(passed_mix), passed_mix)
        adv, diag = aggregate_rewards(
            cfg.reward_aggregator, R_mix, self.reward_weights, mask,
            estimator=cfg.advantage_estimator, w_lambda=cfg.w_lambda, reward_threshold=cfg.reward_threshold,
        )
        diag["groups_kept"] = kept.float().mean().item()
        return adv, mask, diag

    def _step(self) -> dict[str, Any]:
        cfg = self.cfg
        n = cfg.num_generations
        t0 = time.perf_counter()
        rows = self.sampler.next_batch(cfg.prompts_per_step)
        contexts = self.memory_hook.contexts(rows) if self.memory_hook else None
        sampled = self._sample_groups(rows, contexts)
        t1 = time.perf_counter()
        R, passed, gate_rates = self._score(sampled["rows"], sampled["completions"])
        texts = [c.text for c in sampled["completions"]]
        correct = [bool(self.verify(t, r["answer"])) for t, r in zip(texts, sampled["rows"], strict=True)]
        t2 = time.perf_counter()
        crit = self._critique_and_refine(sampled, correct) if self.critic is not None else None
        t3 = time.perf_counter()
        R_mix, passed_mix, kept = self._mixed_group(R, passed, crit)
        adv, mask, diag = self._advantages(R_mix, passed_mix)
        G = len(rows)

        # loss rows: initial samples, then kept refinements, all under the plain (sampling) prompt
        encoded = {p: self._encode(p) for p in set(sampled["prompts"])}  # n samples share one prompt
        prompt_ids = [encoded[p] for p in sampled["prompts"]]
        comp_ids = [c.token_ids for c in sampled["completions"]]
        row_adv = adv[:, :n].reshape(-1).tolist()
        row_mask = mask[:, :n].reshape(-1).tolist()
        offpolicy = [False] * len(comp_ids)
        for g, slot, j in kept:
            prompt_ids.append(prompt_ids[g * n])
            comp_ids.append(crit["ref_completions"][j].token_ids)
            row_adv.append(adv[g, slot].item())
            row_mask.append(bool(mask[g, slot]))
            offpolicy.append(True)
        tokens = pack(prompt_ids, comp_ids, self.tokenizer.pad_token_id)
        tokens.completion_mask *= torch.tensor(row_mask, dtype=tokens.completion_mask.dtype).unsqueeze(-1)
        adv_tok = cfg.eval_weight * torch.tensor(row_adv).unsqueeze(-1).expand(-1, tokens.completion_len).clone()
        ub = UpdateBatch(tokens=tokens, advantages=adv_tok, offpolicy=torch.tensor(offpolicy))
        distill_metrics = self._directive_distillation(ub, crit, sampled) if crit and cfg.distill_weight > 0 else {}
        t4 = time.perf_counter()
        stats = policy_update(self.model, self.ref_model, self.optimizer, self.scheduler, self.accelerator, ub,
                              cfg, norm_constant=float(self.max_new_tokens))
        t5 = time.perf_counter()

        metrics: dict[str, Any] = {"step": self.step + 1}
        for k, name in enumerate(self.reward_names):
            col = R[:, k]
            valid = col[~torch.isnan(col)]
            metrics[f"reward/{name}/mean"] = valid.mean().item() if len(valid) else None
            metrics[f"reward/{name}/std"] = valid.std(unbiased=False).item() if len(valid) else None
            metrics[f"reward/{name}/weight"] = float(diag["effective_weight"][k])
        for gname, rate in gate_rates.items():
            metrics[f"gate/{gname}/pass_rate"] = rate
        metrics["gate/groups_kept"] = diag["groups_kept"]
        metrics["reward/mean"] = (torch.nan_to_num(R, nan=0.0) * self.reward_weights).sum(-1).mean().item()
        grouped = torch.tensor(correct, dtype=torch.float32).view(G, n)
        metrics["train/accuracy"] = grouped.mean().item()
        all_wrong = grouped.sum(-1) == 0
        metrics["train/all_wrong_groups"] = all_wrong.float().mean().item()
        metrics["train/all_right_groups"] = (grouped.sum(-1) == n).float().mean().item()
        metrics["completions/mean_length"] = float(np.mean([len(c.token_ids) for c in sampled["completions"]]))
        metrics["completions/finished"] = float(np.mean([c.finished for c in sampled["completions"]]))
        if crit is not None:
            rescued = {g for g, _, j in kept if crit["ref_correct"][j] and bool(all_wrong[g])}
            metrics["critique/critiqued"] = len(crit["idx"])
            metrics["critique/refinements"] = len(crit["ref_src"])
            metrics["critique/refine_success_rate"] = float(np.mean(crit["ref_correct"])) if crit["ref_src"] else None
            metrics["critique/kept"] = len(kept)
            metrics["critique/groups_rescued"] = len(rescued)
            metrics["critique/all_wrong_groups"] = int(all_wrong.sum())
            metrics["critique/fallbacks"] = sum(c.fallback for c in crit["critiques"])
        if self.critic is not None:
            metrics.update({k: v for k, v in self.critic.metrics().items() if isinstance(v, (int, float))})
        if self.memory_hook is not None:
            crit_text: list[str | None] = [None] * len(texts)
            if crit is not None:
                for i, c in zip(crit["idx"], crit["critiques"], strict=True):
                    crit_text[i] = c.text
            metrics.update(self.memory_hook.update(sampled["rows"], texts, correct, crit_text, self.step + 1, n))
        metrics.update(distill_metrics)
        metrics.update(stats)
        metrics.update({"time/generate": t1 - t0, "time/score": t2 - t1, "time/critique": t3 - t2,
                        "time/prepare": t4 - t3, "time/train": t5 - t4, "time/step": t5 - t0})
        self._log_rollouts(sampled, R, adv[:, :n].reshape(-1), crit)
        return metrics

    def _directive_distillation(self, ub: UpdateBatch, crit: dict[str, Any], sampled: dict[str, Any]) -> dict:
        """Teacher = the policy on the critique-conditioned prompt; student = the policy on q; both scored on
        the student's own tokens. Adds w_dir * A_distill to the per-token advantages (sampled_token) or the
        teacher's top-K for the reverse-KL term (topk_logits)."""
        cfg = self.cfg
        idx = crit["idx"]
        T = ub.tokens.completion_len
        comp = [sampled["completions"][i].token_ids for i in idx]
        teacher = pack([self._encode(p) for p in crit["teacher_prompts"]], comp, self.tokenizer.pad_token_id)
        student = ub.tokens.select(torch.tensor(idx))
        model = self.accelerator.unwrap_model(self.model)
        topk = cfg.distill_topk if cfg.distill_mode == "topk_logits" else None
        t_lp, t_tk_lp, t_tk_idx = teacher_scores(model, teacher.to(self.accelerator.device), cfg.temperature,
                                                 cfg.mini_batch_size, topk)
        s_lp, _, _ = teacher_scores(model, student.to(self.accelerator.device), cfg.temperature, cfg.mini_batch_size)
        Tt = t_lp.shape[1]
        t_lp_full = torch.zeros(len(idx), T)
        t_lp_full[:, : min(T, Tt)] = t_lp[:, :T].cpu()
        m = student.completion_mask.float()
        a_dir = sampled_token_advantage(t_lp_full, s_lp.cpu()) * m
        out = {"distill/kl": ((s_lp.cpu() - t_lp_full) * m).sum().item() / max(1.0, m.sum().item()),
               "distill/rows": len(idx)}
        if cfg.distill_mode == "sampled_token":
            ub.advantages[idx] += cfg.distill_weight * a_dir
        else:
            N, K = ub.advantages.shape[0], t_tk_lp.shape[-1]
            ub.teacher_topk_logp = torch.zeros(N, T, K)
            ub.teacher_topk_idx = torch.zeros(N, T, K, dtype=torch.long)
            ub.teacher_topk_logp[idx, : min(T, Tt)] = t_tk_lp[:, :T].cpu()
            ub.teacher_topk_idx[idx, : min(T, Tt)] = t_tk_idx[:, :T].cpu()
            ub.distill_rows = torch.zeros(N, dtype=torch.bool)
            ub.distill_rows[idx] = True
        return out

    def _log_rollouts(self, sampled: dict[str, Any], R: torch.Tensor, adv: torch.Tensor,
                      crit: dict[str, Any] | None) -> None:
        crit_at: dict[int, int] = {i: j for j, i in enumerate(crit["idx"])} if crit else {}
        ref_at: dict[int, int] = {i: j for j, i in enumerate(crit["ref_src"])} if crit else {}
        # log the first rows, plus critiqued ones so refinements are visible
        chosen = list(range(min(self.cfg.log_rollouts, len(sampled["completions"]))))
        chosen += [i for i in list(crit_at)[: self.cfg.log_rollouts] if i not in chosen]
        for i in chosen:
            row = {
                "step": self.step + 1,
                "prompt": sampled["rows"][i]["prompt"],
                "answer": sampled["rows"][i]["answer"],
                "completion": sampled["completions"][i].text,
                "rewards": dict(zip(self.reward_names, [None if math.isnan(v) else v for v in R[i].tolist()],
                                    strict=True)),
                "advantage": adv[i].item(),
            }
            if i in crit_at:
                row["critique"] = crit["critiques"][crit_at[i]].text
            if i in ref_at:
                j = ref_at[i]
                row["refinement"] = crit["ref_completions"][j].text
                row["refinement_rewards"] = dict(zip(
                    self.reward_names, [None if math.isnan(v) else v for v in crit["R_ref"][j].tolist()], strict=True))
            self.rollout_log.write(row)

    # ------------------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------------------
    def _save(self) -> None:
        self.summary["wall_seconds_before_resume"] = self._wall_prior + time.perf_counter() - self._t_start
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "sampler": self.sampler.state_dict(), "summary": self.summary, "refine_rng": self.rng.getstate()}
        extra = {"memory.sqlite": self.memory_hook.snapshot} if self.memory_hook is not None else None
        ckpt.save_checkpoint(self.out / "checkpoints", self.step, self.accelerator.unwrap_model(self.model),
                             self.tokenizer, state, keep=self.cfg.keep_checkpoints, extra_files=extra)

    def _restore(self, path: Path) -> None:
        state = ckpt.load_trainer_state(path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.summary = state["summary"]
        self.step = state["step"]
        self.rng.setstate(state["refine_rng"])
        self._wall_prior = self.summary.get("wall_seconds_before_resume", 0.0)
        ckpt.set_rng_state(state["rng"])

    # ------------------------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------------------------
    def train(self, resume: bool = False) -> dict[str, Any]:
        """Run SFT warm-up (unless resuming), RL for ``max_steps``, and write the run directory."""
        t_start = self._t_start = time.perf_counter()
        self._wall_prior = 0.0
        resume_from = self._setup(resume)
        self.metrics_log = JsonlWriter(self.out / "metrics.jsonl")
        self.rollout_log = JsonlWriter(self.out / "rollouts.jsonl")
        progress = _progress() if self.cfg.progress else None
        with progress or nullcontext():
            if resume_from is None:
                self._warmup(progress)
                self.metrics_log.write({"step": 0, **self._eval_row0})
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
                    metrics.update(_eval_metrics(self._evaluate()))
                self.metrics_log.write(metrics)
                if progress:
                    progress.update(task_id, advance=1, description=(
                        f"RL acc {metrics['train/accuracy']:.2f} loss {metrics['loss/total']:+.3f}"))
                if self.step % self.cfg.checkpoint_every == 0:
                    self._save()
        return self._finish(t_start)

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

    def _finish(self, t_start: float) -> dict[str, Any]:
        final = self._evaluate()
        self.summary.update({
            "eval_accuracy_after_rl": final["accuracy"],
            "eval_mean_length_after_rl": final["mean_length"],
            **({"eval_ece_after_rl": final["ece"]} if "ece" in final else {}),
            "eval_n": len(self.eval_rows),
            "steps": self.step,
            "task": self.cfg.task,
            "wall_seconds": self._wall_prior + time.perf_counter() - t_start,
        })
        self.summary.update(self._run_totals())
        self.metrics_log.write({"step": self.step, **_eval_metrics(final), "final": True})
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


def _eval_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """``eval/*`` metrics row entries from :func:`evaluate`'s result (accuracy, and calibration when scored)."""
    keys = ("accuracy", "ece", "brier_score", "auroc", "mean_confidence", "unparsable_rate")
    return {f"eval/{k}": result[k] for k in keys if k in result}


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
    ece_before, ece_after = summary.get("eval_ece_before_rl"), summary.get("eval_ece_after_rl")
    if ece_before is not None and ece_after is not None:
        t.add_row("calibration ECE (10 bins): before -> after", f"{ece_before:.3f} -> {ece_after:.3f}")
    if summary.get("critique_refinements"):
        rate = summary.get("critique_refine_success_rate") or 0.0
        t.add_row("refinements written / correct", f"{summary['critique_refinements']} / {rate:.0%}")
        t.add_row("all-wrong groups rescued by a refinement",
                  f"{summary['critique_groups_rescued']} of {summary['critique_all_wrong_groups']}")
    if "memory_lessons" in summary:
        t.add_row("memory: demonstrations / lessons",
                  f"{summary['memory_demonstrations']} / {summary['memory_lessons']}")
    t.add_row("wall time", f"{summary.get('wall_seconds', 0):.0f} s")
    return t
