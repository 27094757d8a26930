"""Training on multi-turn episodes: GRPO over groups of episodes, and Critique-GRPO at the episode level.

One step (``EpisodeTrainer._step``), the single-turn pipeline with episodes as rows::

    tasks = sampler.next_batch(G)                               # G tasks
    trajs = run_episodes(n per task, memory at reset)           # Trajectory: token ids per turn, action masks
    batch = episode_batch(trajs)                                # RolloutBatch, one row per episode
    crit  = critique_and_refine(batch)                          # the critic sees whole episodes, one critique
                                                                # each; refined episodes re-run with it in context
    plan  = advantages(batch, crit)                             # groups of n episodes (+ k refinement slots)
    ub    = update_batch(...)                                   # prompt = first observation (plain context),
                                                                # completion = actions + observations, loss mask
                                                                # = action tokens; distillation on action tokens
    stats = policy_update(ub)                                   # the single-turn update, unchanged
    memory.record(trajs, critiques)                             # success -> demonstration, failure -> lesson

Refined episodes are trained under the plain context (the memory context the initial episodes had, no
critique) with the shaped off-policy term; directive distillation scores the student's own action tokens under
the critique-conditioned context (teacher) and the plain one (student). Same run directory as single-turn
training: metrics.jsonl, rollouts.jsonl (one record per episode, turn by turn), checkpoints with the memory
bank, ``--resume``, summary.json with ``eval_accuracy_before_rl`` / ``eval_accuracy_after_rl`` (held-out
episode success rates) and ``eval_n``. One process (``accelerate launch`` with several is refused).
"""

from __future__ import annotations

import copy
import json
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from critique_rl.agents.memory import EpisodeMemory
from critique_rl.agents.registry import EnvSpec, EpisodeCritic, TranscriptCritic, get_env_spec
from critique_rl.agents.runner import EpisodeLimits, run_episodes
from critique_rl.agents.trajectory import TINY_CHAT_TEMPLATE, Trajectory, TurnRenderer
from critique_rl.agents.warmup import sft_pairs
from critique_rl.algos import aggregate_rewards, apply_gates, sampled_token_advantage
from critique_rl.config import TrainConfig
from critique_rl.errors import ConfigError, UserError
from critique_rl.models import build_tiny_model, build_tiny_tokenizer, load_policy, wants_chat_template
from critique_rl.rollout.factory import build_generator
from critique_rl.train import checkpoint as ckpt
from critique_rl.train.batching import pack
from critique_rl.train.critique_step import choose_refinements, select_for_critique
from critique_rl.train.evaluate import EVAL_SEED
from critique_rl.train.metrics import JsonlWriter, plot_curves, read_jsonl
from critique_rl.train.rollout_batch import AdvantagePlan, RolloutBatch
from critique_rl.train.sampler import PromptSampler
from critique_rl.train.sft import sft_warmup
from critique_rl.train.trainer import lr_schedule, start_run
from critique_rl.train.update import NonFiniteGuard, UpdateBatch, policy_update, score_tokens

TINY_MAX_POSITIONS = 512


class EpisodeCritiques:
    """Critiques of the selected episodes and the refined episodes re-run with them (see the module doc)."""

    def __init__(self, idx: list[int], texts: list[str], fallbacks: int, ref_src: list[int],
                 refined: list[Trajectory]) -> None:
        self.idx, self.texts, self.fallbacks = idx, texts, fallbacks
        self.ref_src, self.refined = ref_src, refined
        self.ref_correct = [t.success for t in refined]

    def text_of(self, row: int) -> str | None:
        return self.texts[self.idx.index(row)] if row in self.idx else None


class EpisodeTrainer:
    """GRPO / Critique-GRPO on episodes of ``args.agent.env`` (see the module docstring).

    Args:
        args: the run config (``agent:`` section set).
        env_spec: use this spec instead of the one ``args.agent.env`` names.
        model / tokenizer: an already-loaded policy (else ``args.model``: ``tiny`` or a local directory).
        critic: an :class:`~critique_rl.agents.registry.EpisodeCritic` or a plain Critic (wrapped in
            :class:`~critique_rl.agents.registry.TranscriptCritic`); None builds one from the config.
        memory: a :class:`~critique_rl.memory.MemoryBank` (else ``args.memory``).
    """

    def __init__(self, args: TrainConfig, env_spec: EnvSpec | None = None, model: Any = None,
                 tokenizer: Any = None, critic: Any = None, memory: Any = None) -> None:
        if args.agent.env is None and env_spec is None:
            raise ConfigError("agent.env", None, "name an environment (e.g. guess_number) to train on episodes")
        self.cfg = args
        self.spec = env_spec or get_env_spec(args.agent.env)  # type: ignore[arg-type]
        self._model_arg, self._tok_arg = model, tokenizer
        self.critic: EpisodeCritic | None = None
        self._critic_arg = critic
        self.bank = memory
        self.out = Path(args.output_dir)
        self.step = 0
        self.summary: dict[str, Any] = {}
        self.is_main = True

    # ------------------------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------------------------
    def _setup(self, resume: bool) -> Path | None:
        cfg, a = self.cfg, self.cfg.agent
        self.accelerator = start_run(cfg, self.out)
        if self.accelerator.num_processes > 1:
            raise UserError("agent training (agent.env) runs in one process; start it without `accelerate launch`")
        if cfg.lora.enabled:
            raise ConfigError("lora.enabled", True, "agent training updates full weights for now; set lora.enabled: "
                              "false")
        if cfg.distill_weight > 0 and cfg.distill_mode != "sampled_token":
            raise ConfigError("distill_mode", cfg.distill_mode, "episode-level distillation uses sampled_token; set "
                              "distill_mode: sampled_token")
        if cfg.rollout_backend != "hf":
            raise ConfigError("rollout_backend", cfg.rollout_backend, "agent training samples with hf for now "
                              "(vLLM has no token-id seam here yet); use hf")
        self.env_kwargs, self.task_kwargs = dict(a.env_kwargs), dict(a.task_kwargs)
        try:
            self.spec.make_env(**self.env_kwargs)
            self.train_tasks = self.spec.make_tasks("train", cfg.sft_examples, cfg.seed, **self.task_kwargs)
            self.eval_tasks = self.spec.make_tasks("eval", cfg.eval_n, EVAL_SEED, **self.task_kwargs)
        except TypeError as exc:
            raise ConfigError("agent.env_kwargs", {**self.env_kwargs, **self.task_kwargs},
                              f"the env '{self.spec.name}' does not take these arguments ({exc})") from None
        resume_from = ckpt.latest_valid_checkpoint(self.out / "checkpoints") if resume else None
        if not resume and ckpt.latest_checkpoint(self.out / "checkpoints") is not None:
            raise UserError(f"output_dir '{self.out}' already holds checkpoints of an earlier run; pass --resume to "
                            "continue it, or choose another --output-dir")
        self.out.mkdir(parents=True, exist_ok=True)
        if resume_from is None:
            for name in ("metrics.jsonl", "rollouts.jsonl"):
                (self.out / name).unlink(missing_ok=True)
        self.model, self.tokenizer = self._load_model(resume_from)
        self.renderer = TurnRenderer(self.tokenizer, wants_chat_template(self.tokenizer, cfg.use_chat_template))
        limit = getattr(self.model.config, "max_position_embeddings", None)
        max_ep = a.max_episode_tokens or (limit if isinstance(limit, int) else None)
        if max_ep is not None and isinstance(limit, int) and max_ep > limit:
            raise ConfigError("agent.max_episode_tokens", max_ep, f"the model has {limit} positions; use <= {limit}")
        self.limits = EpisodeLimits(a.max_turns, a.max_turn_tokens, max_ep)
        self.generator = build_generator("hf", self.model, self.tokenizer,
                                         batch_size=max(cfg.generation_batch_size, cfg.eval_batch_size),
                                         autocast=self.accelerator.autocast)
        self.critic = self._build_critic()
        self.memory = self._build_memory(resume_from)
        self.sampler = PromptSampler(self.train_tasks, cfg.seed)
        self.rng = random.Random(cfg.seed + 1)
        self._nonfinite = NonFiniteGuard(cfg.max_nonfinite_steps)
        cfg.save_yaml(self.out / "config.yaml")
        return resume_from

    def _load_model(self, resume_from: Path | None) -> tuple[Any, Any]:
        cfg = self.cfg
        dev = str(self.accelerator.device.type)
        if resume_from is not None:
            return load_policy(resume_from / "model", device=dev)
        if self._model_arg is not None:
            if self._tok_arg is None:
                raise UserError("pass tokenizer= together with a loaded model object")
            return self._model_arg.to(self.accelerator.device), self._tok_arg
        if cfg.model != "tiny":
            return load_policy(cfg.model, device=dev)
        # the tiny tokenizer learns from rendered warm-up episodes (text rendering needs only the template)
        probe = build_tiny_tokenizer(["0123456789"], vocab_size=300)
        probe.chat_template = TINY_CHAT_TEMPLATE
        texts = [p + c for p, c in self._sft_pairs(TurnRenderer(probe, cfg.use_chat_template != "no"))]
        tok = build_tiny_tokenizer(texts[:20000], cfg.tiny_vocab_size)
        tok.chat_template = TINY_CHAT_TEMPLATE
        model = build_tiny_model(tok, cfg.tiny_hidden_size, cfg.tiny_layers, cfg.tiny_heads,
                                 max_positions=TINY_MAX_POSITIONS, seed=cfg.seed)
        return model.to(self.accelerator.device), tok

    def _sft_pairs(self, renderer: TurnRenderer) -> list[tuple[str, str]]:
        cfg = self.cfg
        return sft_pairs(self.spec, renderer, self.train_tasks, self.env_kwargs, cfg.agent.max_turns,
                         cfg.sft_refine_fraction, cfg.seed, cfg.critic.template_dir)

    def _build_critic(self) -> EpisodeCritic | None:
        cfg = self.cfg
        if cfg.critique_on == "none":
            return None
        given = self._critic_arg
        if given is not None:
            return given if hasattr(given, "critique_episodes") else TranscriptCritic(given)
        if cfg.agent.critique_source == "env":
            if self.spec.critic is None:
                raise ConfigError("agent.critique_source", "env", f"env '{self.spec.name}' has no critic of its own; "
                                  "use critic (the critic: section) or critique_on: none")
            return self.spec.critic()
        if cfg.critic.backend == "none":
            return None
        from critique_rl.critics import build_critic

        return TranscriptCritic(build_critic(cfg.critic, policy=self.model, tokenizer=self.tokenizer,
                                             output_dir=self.out))

    def _build_memory(self, resume_from: Path | None) -> EpisodeMemory | None:
        cfg = self.cfg
        if self.bank is None and not cfg.memory.enabled:
            return None
        from critique_rl.memory import MemoryBank
        from critique_rl.train.memory_hook import MemoryHook

        if self.bank is None:
            bank_path = Path(cfg.memory.bank_path or self.out / "memory.sqlite")
            if resume_from is not None:
                MemoryHook.restore(resume_from / "memory.sqlite", bank_path)
            else:
                MemoryHook.begin_fresh_run(bank_path, self.out)
            self.bank = MemoryBank(bank_path, config=cfg.memory)
        return EpisodeMemory(self.bank, self.spec.name, run_name=self.out.name)

    # ------------------------------------------------------------------------------------------------------
    # phases
    # ------------------------------------------------------------------------------------------------------
    def _warmup(self) -> None:
        cfg = self.cfg
        if cfg.sft_steps > 0:
            t0 = time.perf_counter()
            losses = sft_warmup(self.model, self.tokenizer, self._sft_pairs(self.renderer), steps=cfg.sft_steps,
                                batch_size=cfg.sft_batch_size, lr=cfg.sft_learning_rate, seed=cfg.seed)
            self.summary["sft_final_loss"] = losses[-1]
            self.summary["sft_seconds"] = time.perf_counter() - t0
        before = self._evaluate()
        self.summary["eval_accuracy_before_rl"] = before["eval/accuracy"]
        self.metrics_log.write({"step": 0, **before})

    def _run(self, tasks: list[dict[str, Any]], n: int, *, greedy: bool = False,
             contexts: list[str | None] | None = None) -> list[Trajectory]:
        cfg = self.cfg
        return run_episodes(self.generator, self.renderer, lambda: self.spec.make_env(**self.env_kwargs), tasks,
                            n=n, contexts=contexts, limits=self.limits, temperature=cfg.temperature,
                            top_p=cfg.top_p, greedy=greedy, threaded=cfg.agent.threaded_envs,
                            context_fn=self.memory.context_fn if self.memory is not None else None)

    def _evaluate(self) -> dict[str, float]:
        """Greedy episodes on the held-out tasks (memory read, nothing written): success rate and more."""
        trajs: list[Trajectory] = []
        bs = self.cfg.eval_batch_size
        for s in range(0, len(self.eval_tasks), bs):
            trajs += self._run(self.eval_tasks[s:s + bs], 1, greedy=True)
        if trajs and all(t.stop_reason == "max_tokens" and not t.turns for t in trajs):
            raise ConfigError("agent.max_episode_tokens", self.limits.max_episode_tokens,
                              "no episode fits: the first prompt (memory context included) plus agent.max_turn_tokens "
                              "is longer; raise it (up to the model's positions) or lower memory.token_budget")
        return {"eval/accuracy": float(np.mean([t.success for t in trajs])),
                "eval/mean_turns": float(np.mean([t.num_turns for t in trajs])),
                "eval/mean_return": float(np.mean([t.total_reward for t in trajs]))}

    def _build_optim(self) -> None:
        """AdamW + the single-turn trainer's schedule (warm-up, then constant/linear/cosine), accelerate-wrapped."""
        self.ref_model = None
        cfg = self.cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_schedule(cfg))
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(self.model, self.optimizer,
                                                                              self.scheduler)
        if cfg.kl_beta > 0:
            self.ref_model = copy.deepcopy(self.accelerator.unwrap_model(self.model)).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)

    # ------------------------------------------------------------------------------------------------------
    # one step
    # ------------------------------------------------------------------------------------------------------
    def episode_batch(self, trajs: list[Trajectory], n: int) -> RolloutBatch:
        """Episodes as rows of a :class:`RolloutBatch` (one objective: the episode return)."""
        return RolloutBatch(rows=[t.task for t in trajs],
                            prompts=[self.renderer.first_text(t.turns[0].observation if t.turns else "", t.context)
                                     for t in trajs],
                            completions=[t.to_completion() for t in trajs], group_size=n,
                            rewards=torch.tensor([[t.total_reward] for t in trajs], dtype=torch.float32),
                            passed=torch.tensor([bool(t.turns) for t in trajs]),
                            correct=[t.success for t in trajs],
                            action_masks=[t.action_mask() for t in trajs])

    def _critique_and_refine(self, trajs: list[Trajectory], batch: RolloutBatch) -> EpisodeCritiques | None:
        cfg = self.cfg
        n = batch.group_size
        mode = "all" if cfg.distill_on == "all" and cfg.distill_weight > 0 else cfg.critique_on
        idx = [i for i in select_for_critique(batch.correct, n, mode) if trajs[i].turns]
        if not idx:
            return None
        critiques = self.critic.critique_episodes([trajs[i] for i in idx])  # type: ignore[union-attr]
        texts = [c.text for c in critiques]
        chosen = set(select_for_critique(batch.correct, n, cfg.critique_on)) if mode != cfg.critique_on else set(idx)
        ref_src = [i for i in idx if i in chosen]
        refined = []
        if ref_src:
            refined = self._run([trajs[i].task for i in ref_src], 1,
                                contexts=[texts[idx.index(i)] for i in ref_src])
        return EpisodeCritiques(idx, texts, sum(c.fallback for c in critiques), ref_src, refined)

    def _advantages(self, batch: RolloutBatch, crit: EpisodeCritiques | None) -> AdvantagePlan:
        cfg = self.cfg
        n, G = batch.group_size, batch.num_groups
        k = cfg.refinements_per_group if crit is not None else 0
        R = torch.full((G, n + k, 1), float("nan"))
        R[:, :n] = batch.rewards.view(G, n, 1)
        passed = torch.zeros(G, n + k, dtype=torch.bool)
        passed[:, :n] = batch.passed.view(G, n)
        kept: list[tuple[int, int, int]] = []
        if k and crit is not None:
            usable = [j for j, t in enumerate(crit.refined) if t.turns]
            group_of = [crit.ref_src[j] // n for j in usable]
            chosen = choose_refinements(group_of, [crit.ref_correct[j] for j in usable], k, G, self.rng)
            for g, js in enumerate(chosen):
                for slot, jj in enumerate(js):
                    j = usable[jj]
                    R[g, n + slot, 0] = crit.refined[j].total_reward
                    passed[g, n + slot] = True
                    kept.append((g, n + slot, j))
        mask, groups_kept = apply_gates(torch.ones_like(passed), passed)
        adv, diag = aggregate_rewards(cfg.reward_aggregator, R, torch.ones(1), mask,
                                      estimator=cfg.advantage_estimator, w_lambda=cfg.w_lambda,
                                      reward_threshold=cfg.reward_threshold)
        diag["groups_kept"] = groups_kept.float().mean().item()
        return AdvantagePlan(advantages=adv, mask=mask, kept=kept, diagnostics=diag)

    def _update_batch(self, trajs: list[Trajectory], batch: RolloutBatch, crit: EpisodeCritiques | None,
                      plan: AdvantagePlan) -> tuple[UpdateBatch, dict[str, float]]:
        cfg = self.cfg
        n = batch.group_size
        rows = [i for i, t in enumerate(trajs) if t.turns]
        prompt_ids = [trajs[i].prompt_ids for i in rows]
        comp_ids = [trajs[i].completion_ids() for i in rows]
        masks = [trajs[i].action_mask() for i in rows]
        adv = [plan.advantages[i // n, i % n].item() for i in rows]
        keep = [bool(plan.mask[i // n, i % n]) for i in rows]
        off = [False] * len(rows)
        for g, slot, j in plan.kept:  # refined episode under the plain context (memory, no critique)
            ref = crit.refined[j]  # type: ignore[union-attr]
            src = trajs[crit.ref_src[j]]  # type: ignore[union-attr]
            prompt_ids.append(self.renderer.first(ref.turns[0].observation, src.memory_context))
            comp_ids.append(ref.completion_ids())
            masks.append(ref.action_mask())
            adv.append(plan.advantages[g, slot].item())
            keep.append(bool(plan.mask[g, slot]))
            off.append(True)
        tokens = pack(prompt_ids, comp_ids, self.tokenizer.pad_token_id)
        T = tokens.completion_len
        action = torch.zeros(len(comp_ids), T, dtype=tokens.completion_mask.dtype)
        for r, m in enumerate(masks):
            action[r, : len(m)] = torch.tensor(m, dtype=action.dtype)
        tokens.completion_mask = tokens.completion_mask * action * torch.tensor(keep, dtype=action.dtype)[:, None]
        adv_tok = cfg.eval_weight * torch.tensor(adv).unsqueeze(-1).expand(-1, T).clone()
        ub = UpdateBatch(tokens=tokens, advantages=adv_tok, offpolicy=torch.tensor(off))
        # the engine's log-probs of every row's actions (refined episodes: under the critique context they were
        # sampled in, what offpolicy_weighting reads); zeros on observation tokens
        sampled = [trajs[i] for i in rows] + [crit.refined[j] for _, _, j in plan.kept]  # type: ignore[union-attr]
        ub.sampling_logp = torch.zeros(len(comp_ids), T)
        for r, t in enumerate(sampled):
            lp = t.sampling_logprobs()
            ub.sampling_logp[r, : len(lp)] = torch.tensor(lp)
        metrics: dict[str, float] = {}
        if crit is not None and cfg.distill_weight > 0:
            metrics = self._distill(ub, trajs, rows, crit)
        if cfg.kl_beta > 0 and self.ref_model is not None:
            ub.ref_logp = score_tokens(self.ref_model, tokens.to(self.accelerator.device), cfg.temperature,
                                       cfg.mini_batch_size, self.accelerator.autocast)[0].cpu()
        return ub, metrics

    def _distill(self, ub: UpdateBatch, trajs: list[Trajectory], rows: list[int],
                 crit: EpisodeCritiques) -> dict[str, float]:
        """Directive distillation over action tokens: teacher = the policy with the critique in context,
        student = the policy under the plain context, both on the student's own episode tokens."""
        cfg = self.cfg
        pos = {i: r for r, i in enumerate(rows)}
        pairs = [(pos[i], crit.texts[j]) for j, i in enumerate(crit.idx) if i in pos]
        if not pairs:
            return {}
        sel = [r for r, _ in pairs]
        teacher_prompts = []
        for r, text in pairs:
            t = trajs[rows[r]]
            ctx = "\n\n".join(x for x in (t.memory_context, text) if x)
            teacher_prompts.append(self.renderer.first(t.turns[0].observation, ctx))
        student = ub.tokens.select(torch.tensor(sel))
        T = ub.tokens.completion_len
        comp = [trajs[rows[r]].completion_ids() for r in sel]
        teacher = pack(teacher_prompts, comp, self.tokenizer.pad_token_id)
        model, dev, ac = self.accelerator.unwrap_model(self.model), self.accelerator.device, self.accelerator.autocast
        t_lp = score_tokens(model, teacher.to(dev), cfg.temperature, cfg.mini_batch_size, ac)[0].cpu()
        s_lp = score_tokens(model, student.to(dev), cfg.temperature, cfg.mini_batch_size, ac)[0].cpu()
        t_full = torch.zeros(len(sel), T)
        t_full[:, : min(T, t_lp.shape[1])] = t_lp[:, :T]
        m = student.completion_mask.float()  # action tokens only
        a_dir = sampled_token_advantage(t_full, s_lp) * m
        ub.advantages[sel] += cfg.distill_weight * a_dir
        return {"distill/kl": ((s_lp - t_full) * m).sum().item() / max(1.0, m.sum().item()),
                "distill/rows": float(len(sel))}

    def _step(self) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.perf_counter()
        n = cfg.num_generations
        tasks = self.sampler.next_batch(cfg.prompts_per_step)
        trajs = self._run(tasks, n)
        batch = self.episode_batch(trajs, n)
        t_gen = time.perf_counter()
        crit = self._critique_and_refine(trajs, batch) if self.critic is not None else None
        t_crit = time.perf_counter()
        plan = self._advantages(batch, crit)
        if any(t.turns for t in trajs):
            ub, extra = self._update_batch(trajs, batch, crit, plan)
            stats = policy_update(self.model, self.optimizer, self.scheduler, self.accelerator, ub, cfg,
                                  norm_constant=float(self.limits.max_turns * self.limits.max_new_tokens),
                                  guard=self._nonfinite)
            self.generator.sync_weights()
        else:  # every first prompt was over max_episode_tokens: nothing to learn from
            extra, stats = {}, {"loss/total": None}
        t_train = time.perf_counter()
        metrics = self._metrics(trajs, batch, crit, plan)
        metrics.update(extra)
        metrics.update(stats)
        if self.memory is not None:
            texts = [crit.text_of(i) if crit else None for i in range(len(trajs))]
            metrics.update(self.memory.record(trajs, texts, self.step + 1, n))
        metrics.update({"time/generate": t_gen - t0, "time/critique": t_crit - t_gen, "time/train": t_train - t_crit,
                        "time/step": time.perf_counter() - t0})
        self._log_rollouts(trajs, plan, crit)
        return metrics

    # ------------------------------------------------------------------------------------------------------
    # metrics and logs
    # ------------------------------------------------------------------------------------------------------
    def _metrics(self, trajs: list[Trajectory], batch: RolloutBatch, crit: EpisodeCritiques | None,
                 plan: AdvantagePlan) -> dict[str, Any]:
        n = batch.group_size
        grouped = batch.grouped_correct()
        out: dict[str, Any] = {
            "step": self.step + 1,
            "reward/mean": batch.rewards.mean().item(),
            "train/accuracy": grouped.mean().item(),
            "train/all_wrong_groups": (grouped.sum(-1) == 0).float().mean().item(),
            "train/all_right_groups": (grouped.sum(-1) == n).float().mean().item(),
            "episode/mean_turns": float(np.mean([t.num_turns for t in trajs])),
            "episode/action_tokens": float(np.mean([sum(t.action_mask()) for t in trajs])),
            "episode/observation_tokens": float(np.mean([len(t.action_mask()) - sum(t.action_mask()) for t in trajs])),
            "gate/groups_kept": plan.diagnostics["groups_kept"],
        }
        for reason in ("done", "max_turns", "max_tokens", "error"):
            out[f"episode/stop_{reason}"] = float(np.mean([t.stop_reason == reason for t in trajs]))
        if crit is not None:
            all_wrong = grouped.sum(-1) == 0
            rescued = {g for g, _, j in plan.kept if crit.ref_correct[j] and bool(all_wrong[g])}
            out.update({"critique/critiqued": len(crit.idx), "critique/refinements": len(crit.refined),
                        "critique/refine_success_rate": float(np.mean(crit.ref_correct)) if crit.refined else None,
                        "critique/kept": len(plan.kept), "critique/groups_rescued": len(rescued),
                        "critique/all_wrong_groups": int(all_wrong.sum()), "critique/fallbacks": crit.fallbacks})
        if self.critic is not None:
            out.update({k: v for k, v in self.critic.metrics().items() if isinstance(v, (int, float))})
        return out

    def _log_rollouts(self, trajs: list[Trajectory], plan: AdvantagePlan, crit: EpisodeCritiques | None) -> None:
        n = self.cfg.num_generations
        chosen = list(range(min(self.cfg.log_rollouts, len(trajs))))
        if crit is not None:
            chosen += [i for i in crit.idx[: self.cfg.log_rollouts] if i not in chosen]
        ref_at = {i: j for j, i in enumerate(crit.ref_src)} if crit else {}
        for i in chosen:
            row = {"step": self.step + 1, "group": i // n, "advantage": plan.advantages[i // n, i % n].item(),
                   **trajs[i].to_log()}
            if crit is not None and crit.text_of(i) is not None:
                row["critique"] = crit.text_of(i)
            if i in ref_at:
                row["refinement"] = crit.refined[ref_at[i]].to_log()  # type: ignore[union-attr]
            self.rollout_log.write(row)

    # ------------------------------------------------------------------------------------------------------
    # checkpoints and the loop
    # ------------------------------------------------------------------------------------------------------
    def _save(self) -> None:
        self.summary["wall_seconds_before_resume"] = self._wall_prior + time.perf_counter() - self._t_start
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "sampler": self.sampler.state_dict(), "summary": self.summary, "refine_rng": self.rng.getstate(),
                 "rng_per_rank": [ckpt.rng_state()], "world_size": 1}
        extra = {"memory.sqlite": lambda p: self.bank.snapshot(p)} if self.memory is not None else None
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
        ckpt.set_rng_state(state["rng_per_rank"][0])

    def train(self, resume: bool = False) -> dict[str, Any]:
        """SFT warm-up (unless resuming), ``max_steps`` RL steps on episodes, then the run directory."""
        from critique_rl.train.trainer import deterministic_mode, quiet_library_progress

        with quiet_library_progress(), deterministic_mode(self.cfg.deterministic):
            return self._train(resume)

    def _train(self, resume: bool) -> dict[str, Any]:
        self._t_start = time.perf_counter()
        self._wall_prior = 0.0
        resume_from = self._setup(resume)
        self.metrics_log = JsonlWriter(self.out / "metrics.jsonl")
        self.rollout_log = JsonlWriter(self.out / "rollouts.jsonl")
        if resume_from is None:
            self._warmup()
        self._build_optim()
        if resume_from is not None:
            self._restore(resume_from)
            self.metrics_log.truncate_after_step(self.step)
            self.rollout_log.truncate_after_step(self.step)
        progress = _progress() if self.cfg.progress else None
        with progress or nullcontext():
            task_id = progress.add_task("RL (episodes)", total=self.cfg.max_steps, completed=self.step) if progress else None
            while self.step < self.cfg.max_steps:
                metrics = self._step()
                self.step += 1
                if self.cfg.eval_every and self.step % self.cfg.eval_every == 0 and self.step < self.cfg.max_steps:
                    metrics.update(self._evaluate())
                self.metrics_log.write(metrics)
                if progress:
                    progress.update(task_id, advance=1, description=f"RL success {metrics['train/accuracy']:.2f}")
                if self.step % self.cfg.checkpoint_every == 0:
                    self._save()
        return self._finish()

    def _finish(self) -> dict[str, Any]:
        final = self._evaluate()
        self.summary.update({"eval_accuracy_after_rl": final["eval/accuracy"],
                             "eval_mean_turns_after_rl": final["eval/mean_turns"], "eval_n": len(self.eval_tasks),
                             "steps": self.step, "task": self.spec.name, "env": self.spec.name})
        if self.step % self.cfg.checkpoint_every != 0 and self.step > 0:
            self._save()
        self.summary["wall_seconds"] = self._wall_prior + time.perf_counter() - self._t_start
        rows = [r for r in read_jsonl(self.out / "metrics.jsonl") if "loss/total" in r]  # resumed runs count too
        if any("critique/refinements" in r for r in rows):
            ref = sum(r.get("critique/refinements", 0) for r in rows)
            ok = sum((r.get("critique/refine_success_rate") or 0) * r.get("critique/refinements", 0) for r in rows)
            self.summary.update({"critique_refinements": ref, "critique_refine_success_rate": ok / ref if ref else None,
                                 "critique_groups_rescued": sum(r.get("critique/groups_rescued", 0) for r in rows),
                                 "critique_all_wrong_groups": sum(r.get("critique/all_wrong_groups", 0) for r in rows)})
        if self.bank is not None:
            st = self.bank.stats()
            self.summary.update({"memory_bank": st["path"], "memory_demonstrations": st["demonstrations"]["count"],
                                 "memory_lessons": st["lessons"]["count"]})
        self.metrics_log.write({"step": self.step, **final, "final": True})
        self.metrics_log.close()
        self.rollout_log.close()
        policy = self.accelerator.unwrap_model(self.model)
        policy.save_pretrained(self.out / "final")
        self.tokenizer.save_pretrained(self.out / "final")
        plot_curves(self.out / "metrics.jsonl", self.out / "curves.png")
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=2))
        return self.summary


def _progress() -> Any:
    from critique_rl.train.trainer import _progress as make

    return make()
