"""Multi-turn episodes as a rollout source of the one trainer (:class:`critique_rl.train.trainer.CritiqueGRPOTrainer`).

One step on episodes, the single-turn pipeline with episodes as rows::

    tasks = sampler.next_batch(G), this process's shard    # G tasks, split over processes by rank
    trajs = run_episodes(n per task, memory at reset)      # Trajectory: token ids per turn, action masks
    batch = episode_batch(trajs)                           # RolloutBatch, one row per episode
    crit  = critique_and_refine(batch)                     # the critic sees whole episodes, one critique each;
                                                           # refined episodes re-run with it in context
    plan  = advantages(batch, crit)                        # groups of n episodes (+ k refinement slots)
    ub    = update_batch(...)                              # prompt = first observation (plain context),
                                                           # completion = actions + observations, loss mask
                                                           # = action tokens; distillation on action tokens
    (the trainer's policy update, weight sync, EMA teacher, logging, checkpoints)
    memory.record(trajs, critiques)                        # success -> demonstration, failure -> lesson

Refined episodes are trained under the plain context (the memory context the initial episodes had, no
critique) with the shaped off-policy term; directive distillation scores the student's own action tokens under
the critique-conditioned context (teacher) and the plain one (student): ``sampled_token`` adds the log-ratio
to the advantages, ``topk_logits`` keeps the teacher's top-K for the divergence term of the update.
"""

from __future__ import annotations

import copy
import dataclasses
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from critique_rl.agents import episode_filters as filters
from critique_rl.agents.episode_distill import distill_episodes
from critique_rl.agents.episode_phases import EpisodePhases, EpisodePool
from critique_rl.agents.episode_seeds import group_rng, seeded, task_seed
from critique_rl.agents.memory import EpisodeMemory
from critique_rl.agents.registry import EnvSpec, EpisodeCritic, TranscriptCritic
from critique_rl.agents.runner import EpisodeLimits, run_episodes
from critique_rl.agents.trajectory import TINY_CHAT_TEMPLATE, Trajectory, TurnRenderer
from critique_rl.agents.warmup import sft_id_pairs, sft_pairs
from critique_rl.algos import aggregate_rewards, apply_gates
from critique_rl.errors import ConfigError
from critique_rl.models import build_tiny_model, build_tiny_tokenizer, wants_chat_template
from critique_rl.train import distributed as dist
from critique_rl.train.batching import pack
from critique_rl.train.critique_stage import reference_logprobs
from critique_rl.train.critique_step import choose_refinements, select_for_critique
from critique_rl.train.evaluate import EVAL_SEED
from critique_rl.train.rollout_batch import AdvantagePlan, RolloutBatch
from critique_rl.train.sampler import PromptSampler
from critique_rl.train.selection import SelectionState
from critique_rl.train.step_context import EpisodeRun, EpisodeStep
from critique_rl.train.update import UpdateBatch

if TYPE_CHECKING:
    from critique_rl.config import TrainConfig
    from critique_rl.train.trainer import CritiqueGRPOTrainer

TINY_MAX_POSITIONS = 512
_Source = TypeVar("_Source", bound="EpisodeSource")


@dataclass(frozen=True)
class EpisodeCritiques:
    """Critiques of the selected episodes (``idx`` into the batch) and the refined episodes re-run with them
    (``refined[j]`` from row ``ref_src[j]``)."""

    idx: list[int]
    texts: list[str]
    fallbacks: int
    ref_src: list[int]
    refined: list[Trajectory]

    @property
    def ref_correct(self) -> list[bool]:
        return [t.success for t in self.refined]

    def text_of(self, row: int) -> str | None:
        return self.texts[self.idx.index(row)] if row in self.idx else None


class EpisodeSource:
    """Episodes of an environment (``agent:`` section) as the trainer's rollout source.

    The trainer owns the model, optimizer, engine, phases, checkpoints and logs; this object owns the tasks,
    the renderer, the episode critic and the episode memory, and turns episodes into the typed values of a step.
    It never holds the trainer: setup gets the config (:meth:`setup_data`) and an :class:`EpisodeRun`
    (:meth:`setup_model`); the stages of a step run on :meth:`for_step`'s view, which reads the step's
    :class:`EpisodeStep` (``ctx``). What a stage changes comes back as a value (a new selection state, the phases'
    samplers) for the trainer to keep.
    """

    kind = "episodes"

    def __init__(self, spec: EnvSpec, critic: Any = None, bank: Any = None) -> None:
        self.spec = spec
        self._critic_arg = critic
        self.bank = bank
        self.memory: EpisodeMemory | None = None
        self.critic: EpisodeCritic | None = None
        self._ctx: EpisodeStep | None = None

    def for_step(self: _Source, ctx: EpisodeStep) -> _Source:
        """This source for one step: a shallow copy (the same tasks, renderer, critic and memory) whose stages
        read ``ctx``. The source itself is not changed."""
        view = copy.copy(self)
        view._ctx = ctx
        return view

    @property
    def ctx(self) -> EpisodeStep:
        if self._ctx is None:
            raise RuntimeError("the stages of a step run on the source's view for that step: source.for_step(ctx)")
        return self._ctx

    # ------------------------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------------------------
    @staticmethod
    def check_config(cfg: Any, world: int) -> None:
        """What episode training refuses (each with the field and the fix): what has no meaning on episodes."""
        if cfg.tasks:
            raise ConfigError("tasks", cfg.tasks, "episode training draws tasks from the environment; leave tasks out")
        if cfg.refinement_source == "reference":
            raise ConfigError("refinement_source", "reference", "episodes have no reference answer; use critic")
        for i, ph in enumerate(cfg.phases):
            for name in ("train_file", "reward_funcs", "reward_weights", "tasks"):
                if getattr(ph, name) is not None:
                    raise ConfigError(f"phases[{i}].{name}", getattr(ph, name), "on episodes the environment gives "
                                      "the data and the reward: a phase sets its own tasks with phases[i].task_kwargs "
                                      f"and its env with phases[i].env_kwargs; remove {name}")

    # ------------------------------------------------------------------------------------------------------
    def setup_data(self, cfg: TrainConfig) -> None:
        """The run's config; the env's training and held-out tasks and every phase's pool."""
        a = cfg.agent
        self.cfg = cfg
        self.env_kwargs, self.task_kwargs = dict(a.env_kwargs), dict(a.task_kwargs)
        try:
            self.spec.make_env(**self.env_kwargs)
            self.train_tasks = self.spec.make_tasks("train", cfg.sft_examples, cfg.seed, **self.task_kwargs)
            self.eval_tasks = self.spec.make_tasks("eval", cfg.eval_n, EVAL_SEED, **self.task_kwargs)
        except TypeError as exc:
            raise ConfigError("agent.env_kwargs", {**self.env_kwargs, **self.task_kwargs},
                              f"the env '{self.spec.name}' does not take these arguments ({exc})") from None
        self.phases = EpisodePhases(self.spec, cfg.schedule(), self.train_tasks, self.env_kwargs, self.task_kwargs,
                                    cfg.sft_examples, cfg.seed)

    def build_tiny(self) -> tuple[Any, Any]:
        """The tiny policy: its tokenizer learns from rendered warm-up episodes (rendering needs only the
        chat template)."""
        cfg = self.cfg
        probe = build_tiny_tokenizer(["0123456789"], vocab_size=300)
        probe.chat_template = TINY_CHAT_TEMPLATE
        probe_renderer = TurnRenderer(probe, cfg.use_chat_template != "no")
        texts = [p + c for p, c in self._sft_pairs(cfg, probe_renderer)]
        for pool in self.phases.distinct():  # phases with their own tasks: their episodes are spelled too
            texts += [p + c for p, c in self._sft_pairs(cfg, probe_renderer, pool)]
        tok = build_tiny_tokenizer(texts[:20000], cfg.tiny_vocab_size)
        tok.chat_template = TINY_CHAT_TEMPLATE
        model = build_tiny_model(tok, cfg.tiny_hidden_size, cfg.tiny_layers, cfg.tiny_heads,
                                 max_positions=TINY_MAX_POSITIONS, seed=cfg.seed)
        return model, tok

    def setup_model(self, run: EpisodeRun, resume_from: Path | None) -> dict[str, PromptSampler]:
        """Renderer, episode limits, critic and memory, once the policy and tokenizer exist. Returns the phases'
        own samplers by checkpoint key (the trainer checkpoints them with its own)."""
        cfg, a = self.cfg, self.cfg.agent
        self.run_info = run
        self.renderer = TurnRenderer(run.tokenizer, wants_chat_template(run.tokenizer, cfg.use_chat_template))
        limit = getattr(run.model.config, "max_position_embeddings", None)
        max_ep = a.max_episode_tokens or (limit if isinstance(limit, int) else None)
        if max_ep is not None and isinstance(limit, int) and max_ep > limit:
            raise ConfigError("agent.max_episode_tokens", max_ep, f"the model has {limit} positions; use <= {limit}")
        self.limits = EpisodeLimits(a.max_turns, a.max_turn_tokens, max_ep)
        self.critic = self._build_critic(run)
        self.memory = self._build_memory(run, resume_from)  # every process reads; the main process writes
        return self.phases.samplers()  # the phases' own samplers travel with checkpoints

    def _sft_pairs(self, cfg: Any, renderer: TurnRenderer, pool: EpisodePool | None = None) -> list[tuple[str, str]]:
        pool = pool or self.phases.run
        return sft_pairs(self.spec, renderer, pool.tasks, pool.env_kwargs, cfg.agent.max_turns,
                         cfg.sft_refine_fraction, cfg.seed, cfg.critic.template_dir)

    def sft_pairs(self, phase: int) -> list[tuple[list[int], list[int]]]:
        """Warm-up pairs of (sft) phase ``phase`` as the runner's token ids: (context ids, action ids + EOS) for
        every turn of the scripted episodes of its tasks (re-tokenising the rendered text would give other ids
        with a chat template). ``_sft_pairs`` (text) stays: build_tiny trains the tokenizer on the text form."""
        cfg, pool = self.cfg, self.phases.pool(phase)
        return sft_id_pairs(self.spec, self.renderer, pool.tasks, pool.env_kwargs, cfg.agent.max_turns,
                            cfg.sft_refine_fraction, cfg.seed, cfg.critic.template_dir)

    def _pool(self) -> tuple[EpisodePool, PromptSampler]:
        """The step's phase's tasks and env arguments, and the sampler that draws them."""
        pool = self.phases.pool(self.ctx.phase)
        return pool, pool.sampler if pool.sampler is not None else self.ctx.sampler

    def _build_critic(self, run: EpisodeRun) -> EpisodeCritic | None:
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

        return TranscriptCritic(build_critic(cfg.critic, policy=run.model, tokenizer=run.tokenizer, output_dir=run.out))

    def _build_memory(self, run: EpisodeRun, resume_from: Path | None) -> EpisodeMemory | None:
        cfg = self.cfg
        if self.bank is None and not cfg.memory.enabled:
            return None
        from critique_rl.memory import MemoryBank
        from critique_rl.train.memory_hook import MemoryHook

        if self.bank is None:
            bank_path = Path(cfg.memory.bank_path or run.out / "memory.sqlite")
            if run.is_main:  # one process puts the bank file in place before any opens it
                if resume_from is not None:
                    MemoryHook.restore(resume_from / "memory.sqlite", bank_path)
                else:
                    MemoryHook.begin_fresh_run(bank_path, run.out)
            run.wait_for_everyone()
            self.bank = MemoryBank(bank_path, config=cfg.memory)
        return EpisodeMemory(self.bank, self.spec.name, run_name=run.out.name, min_score=cfg.memory.min_score)

    def weight_update(self) -> AbstractContextManager[None]:
        """Held around every change of the policy's weights (see :class:`RolloutSource`): nothing in process."""
        return nullcontext()

    def checkpoint_files(self) -> dict[str, Any] | None:
        return {"memory.sqlite": lambda p: self.bank.snapshot(p)} if self.memory is not None else None

    # ------------------------------------------------------------------------------------------------------
    # episodes
    # ------------------------------------------------------------------------------------------------------
    def run(self, generator: Any, tasks: list[dict[str, Any]], n: int, *, greedy: bool = False,
            contexts: list[str | None] | None = None, env_kwargs: dict[str, Any] | None = None) -> list[Trajectory]:
        """``n`` episodes per task (``env_kwargs``: the env's arguments, default the run's)."""
        cfg = self.cfg
        kw = self.env_kwargs if env_kwargs is None else env_kwargs
        return run_episodes(generator, self.renderer, lambda: self.spec.make_env(**kw), tasks,
                            n=n, contexts=contexts, limits=self.limits, temperature=cfg.temperature,
                            top_p=cfg.top_p, greedy=greedy, threaded=cfg.agent.threaded_envs,
                            context_fn=self.memory.context_fn if self.memory is not None else None)

    def run_groups(self, generator: Any, tasks: list[dict[str, Any]], n: int, *, keys: list[int], purpose: str,
                   step: int, contexts: list[str | None] | None = None,
                   env_kwargs: dict[str, Any] | None = None) -> list[Trajectory]:
        """:meth:`run` for sampled training episodes. ``keys[i]``: task ``i``'s place in the global batch. With
        ``agent.seed_per_task`` each run of equal consecutive keys is sampled under its own seed (see
        :mod:`critique_rl.agents.episode_seeds`; ``step``: the steps done); else all in one batched run."""
        cfg = self.cfg
        # env arguments only where a phase changes them (a subclass's run may take the run's env only)
        kw = {} if env_kwargs is None or env_kwargs == self.env_kwargs else {"env_kwargs": env_kwargs}
        if not cfg.agent.seed_per_task:
            return self.run(generator, tasks, n, contexts=contexts, **kw)
        out: list[Trajectory] = []
        s = 0
        while s < len(tasks):
            e = s + 1
            while e < len(tasks) and keys[e] == keys[s]:
                e += 1
            with seeded(task_seed(cfg.seed, step, keys[s], purpose)):
                out += self.run(generator, tasks[s:e], n, contexts=None if contexts is None else contexts[s:e], **kw)
            s = e
        return out

    def evaluate(self, generator: Any) -> dict[str, Any]:
        """Greedy episodes on the held-out tasks (memory read, nothing written), each process its share:
        ``accuracy`` (success rate), ``mean_turns``, ``mean_return``."""
        n, run = len(self.eval_tasks), self.run_info
        mine = self.eval_tasks[run.rank * n // run.world: (run.rank + 1) * n // run.world]
        trajs: list[Trajectory] = []
        bs = self.cfg.eval_batch_size
        for s in range(0, len(mine), bs):
            trajs += self.run(generator, mine[s:s + bs], 1, greedy=True)
        if trajs and all(x.stop_reason == "max_tokens" and not x.turns for x in trajs):
            raise ConfigError("agent.max_episode_tokens", self.limits.max_episode_tokens,
                              "no episode fits: the first prompt (memory context included) plus agent.max_turn_tokens "
                              "is longer; raise it (up to the model's positions) or lower memory.token_budget")
        rows = [(x.success, x.num_turns, x.total_reward) for x in trajs]
        rows = [r for part in dist.gather_objects(rows) for r in part]
        return {"accuracy": float(np.mean([r[0] for r in rows])), "mean_turns": float(np.mean([r[1] for r in rows])),
                "mean_return": float(np.mean([r[2] for r in rows]))}

    @staticmethod
    def eval_metrics(result: dict[str, Any]) -> dict[str, Any]:
        return {f"eval/{k}": result[k] for k in ("accuracy", "mean_turns", "mean_return")}

    def final_summary(self, final: dict[str, Any], steps: int, wall_seconds: float) -> dict[str, Any]:
        return {"eval_accuracy_after_rl": final["accuracy"], "eval_mean_turns_after_rl": final["mean_turns"],
                "eval_n": len(self.eval_tasks), "task": self.spec.name, "env": self.spec.name, "steps": steps,
                "wall_seconds": wall_seconds}

    # ------------------------------------------------------------------------------------------------------
    # the stages of a step
    # ------------------------------------------------------------------------------------------------------
    def measure_pass_rates(self) -> tuple[dict[str, Any], SelectionState]:
        """``pass_rate_filter`` on the step's phase's tasks (:func:`episode_filters.measure_pass_rates`): the
        metrics and the new selection state (the trainer asks this before RL, every ``refresh_every`` steps and
        when an rl phase with its own tasks starts, :meth:`measures_new_pool`)."""
        return filters.measure_pass_rates(self, *self._pool())

    def measures_new_pool(self) -> bool:
        """Whether the step starts an rl phase with its own tasks (after the first step, whose pool is measured
        before RL): ``pass_rate_filter`` measures that pool first."""
        ctx = self.ctx
        return (self.cfg.pass_rate_filter.enabled and ctx.step > 0 and self.phases.pool(ctx.phase).key is not None
                and ctx.step == self.phases.start_step(ctx.phase))

    def collect(self, timer: Any) -> tuple[RolloutBatch, dict[str, Any]]:
        """This process's share of the step's tasks (the current phase's), ``n`` episodes each, as a
        :class:`RolloutBatch`; with ``dynamic_sampling`` groups of equal returns are replaced by further draws."""
        cfg, ctx, run = self.cfg, self.ctx, self.run_info
        n, P = cfg.num_generations, cfg.prompts_per_step
        pool, sampler = self._pool()
        draws = [0]

        def draw() -> RolloutBatch:
            with timer("generate"):
                tasks = dist.shard(sampler.next_batch(P), run.rank, run.world)
                keys = [run.rank * len(tasks) + j for j in range(len(tasks))]
                trajs = self.run_groups(ctx.engine, tasks, n, keys=keys, purpose=f"collect{draws[0]}", step=ctx.step,
                                        env_kwargs=pool.env_kwargs)
            draws[0] += 1
            return self.episode_batch(trajs, n)

        ds = cfg.dynamic_sampling
        fill = filters.fill_episodes(draw(), draw, ds.max_refill_batches, enabled=ds.enabled)
        # the trainer adds selection/samples to its selection state once collect returns
        pool_size = len(sampler.rows) - len(sampler.excluded) if cfg.pass_rate_filter.enabled else None
        return fill.batch, filters.fill_metrics(fill, ctx.selection.samples_total + fill.samples, ds.enabled, pool_size)

    def episode_batch(self, trajs: list[Trajectory], n: int) -> RolloutBatch:
        """Episodes as rows of a :class:`RolloutBatch` (one objective: the episode return)."""
        return RolloutBatch(rows=[x.task for x in trajs],
                            prompts=[self.renderer.first_text(x.turns[0].observation if x.turns else "", x.context)
                                     for x in trajs],
                            completions=[x.to_completion() for x in trajs], group_size=n,
                            rewards=torch.tensor([[x.total_reward] for x in trajs], dtype=torch.float32),
                            passed=torch.tensor([bool(x.turns) for x in trajs]),
                            correct=[x.success for x in trajs],
                            action_masks=[x.action_mask() for x in trajs], episodes=trajs)

    def critique_and_refine(self, batch: RolloutBatch) -> EpisodeCritiques | None:
        if self.critic is None:
            return None
        cfg, ctx = self.cfg, self.ctx
        trajs, n = batch.episodes, batch.group_size
        mode = "all" if cfg.distill_on == "all" and cfg.distill_weight > 0 else cfg.critique_on
        idx = [i for i in select_for_critique(batch.correct, n, mode) if trajs[i].turns]
        if not idx:
            return None
        critiques = self.critic.critique_episodes([trajs[i] for i in idx])
        texts = [c.text for c in critiques]
        chosen = set(select_for_critique(batch.correct, n, cfg.critique_on)) if mode != cfg.critique_on else set(idx)
        ref_src = [i for i in idx if i in chosen]
        refined = []
        if ref_src:  # keyed by the source episode's global group (seed_per_task)
            G = batch.num_groups
            refined = self.run_groups(ctx.engine, [trajs[i].task for i in ref_src], 1,
                                      keys=[self.run_info.rank * G + i // n for i in ref_src], purpose="refine",
                                      step=ctx.step, contexts=[texts[idx.index(i)] for i in ref_src],
                                      env_kwargs=self._pool()[0].env_kwargs)
        return EpisodeCritiques(idx, texts, sum(c.fallback for c in critiques), ref_src, refined)

    def advantages(self, batch: RolloutBatch, crit: EpisodeCritiques | None) -> AdvantagePlan:
        """Group advantages over n episodes (+ k refinement slots). Groups are whole inside a process and the
        episode path has one objective, so a group's advantages need no other process's groups."""
        cfg = self.cfg
        n, G = batch.group_size, batch.num_groups
        k = cfg.refinements_per_group if crit is not None else 0
        R = torch.full((G, n + k, 1), float("nan"))
        R[:, :n] = batch.rewards.view(G, n, 1)
        passed = torch.zeros(G, n + k, dtype=torch.bool)
        passed[:, :n] = batch.passed.view(G, n)
        kept: list[tuple[int, int, int]] = []
        if k and crit is not None:
            usable = [j for j, x in enumerate(crit.refined) if x.turns]
            group_of = [crit.ref_src[j] // n for j in usable]
            chosen = self._choose(group_of, [crit.ref_correct[j] for j in usable], k, G)
            for g, js in enumerate(chosen):
                for slot, jj in enumerate(js):
                    j = usable[jj]
                    R[g, n + slot, 0] = crit.refined[j].total_reward
                    passed[g, n + slot] = True
                    kept.append((g, n + slot, j))
        mask, groups_kept = apply_gates(torch.ones_like(passed), passed)
        lv = cfg.low_variance_filter
        dropped = None
        if lv.enabled:  # DRO: on the initial episodes' returns, decided over all processes' groups
            drop, dropped = filters.low_variance_groups(batch.rewards, n, lv.min_std, lv.drop_fraction,
                                                      self.run_info.rank)
            mask = mask & ~drop.unsqueeze(-1)
        adv, diag = aggregate_rewards(cfg.reward_aggregator, R, torch.ones(1), mask,
                                      estimator=cfg.advantage_estimator, w_lambda=cfg.w_lambda,
                                      reward_threshold=cfg.reward_threshold)
        diag["groups_kept"] = groups_kept.float().mean().item()
        if dropped is not None:
            diag["low_variance_dropped"] = dropped
        return AdvantagePlan(advantages=adv, mask=mask, kept=kept, diagnostics=diag)

    def _choose(self, group_of: list[int], correct: list[bool], k: int, G: int) -> list[list[int]]:
        """Refinements per group (Critique-GRPO's choice); with ``seed_per_task`` each group draws from its own
        RNG (:func:`group_rng`), so the choice does not depend on the process count."""
        ctx, rank = self.ctx, self.run_info.rank
        if not self.cfg.agent.seed_per_task:
            return choose_refinements(group_of, correct, k, G, ctx.rng)
        chosen = []
        for g in range(G):
            js = [j for j, gg in enumerate(group_of) if gg == g]
            pick = choose_refinements([0] * len(js), [correct[j] for j in js], k, 1,
                                      group_rng(self.cfg.seed, ctx.step, rank * G + g))[0]
            chosen.append([js[p] for p in pick])
        return chosen

    def norm_constant(self) -> float:
        return float(self.limits.max_turns * self.limits.max_new_tokens)

    def update_batch(self, batch: RolloutBatch, crit: EpisodeCritiques | None,
                     plan: AdvantagePlan) -> tuple[UpdateBatch | None, dict[str, float]]:
        """Loss rows: episodes with at least one turn, then kept refined episodes under the plain context. None
        when no episode has a turn (every first prompt was over ``max_episode_tokens``)."""
        cfg, models = self.cfg, self.ctx.models
        trajs, n = batch.episodes, batch.group_size
        rows = [i for i, x in enumerate(trajs) if x.turns]
        if not rows:
            return None, {}
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
        pad_id = self.run_info.tokenizer.pad_token_id
        packed = pack(prompt_ids, comp_ids, pad_id)
        T = packed.completion_len
        action = torch.zeros(len(comp_ids), T, dtype=packed.completion_mask.dtype)
        for r, m in enumerate(masks):
            action[r, : len(m)] = torch.tensor(m, dtype=action.dtype)
        tokens = dataclasses.replace(packed, completion_mask=packed.completion_mask * action
                                     * torch.tensor(keep, dtype=action.dtype)[:, None])
        adv_tok = cfg.eval_weight * torch.tensor(adv).unsqueeze(-1).expand(-1, T).clone()
        # the engine's log-probs of every row's actions (refined episodes: under the critique context they were
        # sampled in, what offpolicy_weighting reads); zeros on observation tokens
        sampled = [trajs[i] for i in rows] + [crit.refined[j] for _, _, j in plan.kept]  # type: ignore[union-attr]
        sampling_logp = torch.zeros(len(comp_ids), T)
        for r, x in enumerate(sampled):
            lp = x.sampling_logprobs()
            sampling_logp[r, : len(lp)] = torch.tensor(lp)
        ub = UpdateBatch(tokens=tokens, advantages=adv_tok, offpolicy=torch.tensor(off), sampling_logp=sampling_logp)
        metrics: dict[str, float] = {}
        if crit is not None and cfg.distill_weight > 0:  # a new batch with the distillation terms
            ub, metrics = distill_episodes(ub, trajs, rows, crit, cfg=cfg, models=models, renderer=self.renderer,
                                           pad_id=pad_id)
        if cfg.kl_beta > 0:
            ub = dataclasses.replace(ub, ref_logp=reference_logprobs(models, cfg, ub).cpu())
        return ub, metrics

    # ------------------------------------------------------------------------------------------------------
    # metrics, rollouts, memory
    # ------------------------------------------------------------------------------------------------------
    def step_metrics(self, batch: RolloutBatch, crit: EpisodeCritiques | None, plan: AdvantagePlan,
                     local: dict[str, Any], selection: dict[str, Any]) -> dict[str, Any]:
        """The step's metrics: this process's, merged over processes; then the memory bank's (main process)."""
        trajs, n = batch.episodes, batch.group_size
        grouped = batch.grouped_correct()
        out: dict[str, Any] = {
            "step": self.ctx.step + 1,
            "reward/mean": batch.rewards.mean().item(),
            "train/accuracy": grouped.mean().item(),
            "train/all_wrong_groups": (grouped.sum(-1) == 0).float().mean().item(),
            "train/all_right_groups": (grouped.sum(-1) == n).float().mean().item(),
            "episode/mean_turns": float(np.mean([x.num_turns for x in trajs])),
            "episode/action_tokens": float(np.mean([sum(x.action_mask()) for x in trajs])),
            "episode/observation_tokens": float(np.mean([len(x.action_mask()) - sum(x.action_mask()) for x in trajs])),
            "gate/groups_kept": plan.diagnostics["groups_kept"],
        }
        for reason in ("done", "max_turns", "max_tokens", "error"):
            out[f"episode/stop_{reason}"] = float(np.mean([x.stop_reason == reason for x in trajs]))
        if crit is not None:
            all_wrong = grouped.sum(-1) == 0
            rescued = {g for g, _, j in plan.kept if crit.ref_correct[j] and bool(all_wrong[g])}
            out.update({"critique/critiqued": len(crit.idx), "critique/refinements": len(crit.refined),
                        "critique/refine_success_rate": float(np.mean(crit.ref_correct)) if crit.refined else None,
                        "critique/kept": len(plan.kept), "critique/groups_rescued": len(rescued),
                        "critique/all_wrong_groups": int(all_wrong.sum()), "critique/fallbacks": crit.fallbacks})
        if self.critic is not None:
            out.update({k: v for k, v in self.critic.metrics().items() if isinstance(v, (int, float))})
        out.update(local)
        out = dist.merge_metrics(dist.gather_objects(out))
        out.update(selection)
        if "low_variance_dropped" in plan.diagnostics:  # already counted over all processes
            out["selection/low_variance_dropped"] = plan.diagnostics["low_variance_dropped"]
        out.update(self._memory_update(batch, crit))
        return out

    def _memory_update(self, batch: RolloutBatch, crit: EpisodeCritiques | None) -> dict[str, Any]:
        """Record and credit on the main process, from the episodes of every process (in rank order)."""
        if self.memory is None:
            return {}
        texts = [crit.text_of(i) if crit else None for i in range(len(batch.episodes))]
        parts = dist.gather_objects((batch.episodes, texts))
        metrics: dict[str, Any] = {}
        if self.run_info.is_main:
            trajs = [x for p in parts for x in p[0]]
            crits = [c for p in parts for c in p[1]]
            metrics = self.memory.record(trajs, crits, self.ctx.step + 1, batch.group_size)
        return dist.broadcast_object(metrics)

    def log_rollouts(self, batch: RolloutBatch, plan: AdvantagePlan, crit: EpisodeCritiques | None) -> None:
        ctx, run, log_n = self.ctx, self.run_info, self.cfg.log_rollouts
        trajs, n = batch.episodes, batch.group_size
        chosen = list(range(min(log_n, len(trajs))))
        if crit is not None:
            chosen += [i for i in crit.idx[:log_n] if i not in chosen]
        ref_at = {i: j for j, i in enumerate(crit.ref_src)} if crit else {}
        out = []
        for i in chosen:
            row = {"step": ctx.step + 1, "group": i // n, "advantage": plan.advantages[i // n, i % n].item(),
                   **trajs[i].to_log()}
            if run.world > 1:
                row["rank"] = run.rank
            if crit is not None and crit.text_of(i) is not None:
                row["critique"] = crit.text_of(i)
            if i in ref_at:
                row["refinement"] = crit.refined[ref_at[i]].to_log()  # type: ignore[union-attr]
            out.append(row)
        for part in dist.gather_objects(out):
            if run.is_main:
                for row in part:
                    ctx.rollout_log.write(row)


def EpisodeTrainer(args: Any, env_spec: EnvSpec | None = None, model: Any = None, tokenizer: Any = None,  # noqa: N802
                   critic: Any = None, memory: Any = None) -> CritiqueGRPOTrainer:
    """The one trainer on episodes (the name earlier releases had for a second trainer): the same as
    ``CritiqueGRPOTrainer(args=args, env_spec=..., ...)`` with ``args.agent.env`` (or ``env_spec``) set.
    ``critic``: an :class:`EpisodeCritic` or a plain Critic (read as transcripts); ``memory``: a MemoryBank."""
    from critique_rl.train.trainer import CritiqueGRPOTrainer

    if args.agent.env is None and env_spec is None:
        raise ConfigError("agent.env", None, "name an environment (e.g. guess_number) to train on episodes")
    return CritiqueGRPOTrainer(args=args, env_spec=env_spec, model=model, tokenizer=tokenizer, critic=critic,
                               memory=memory)
