"""The training loop: SFT warm-up, then GRPO / Critique-GRPO steps, evaluation, checkpoints.

Read top to bottom: ``train()`` -> ``_setup`` -> ``_warmup`` -> loop of ``_step`` -> ``_finish``.
One step is a pipeline of stages over typed values (:mod:`critique_rl.train.rollout_batch`), asked of the run's
rollout source (single-turn prompts, :class:`~critique_rl.train.prompt_source.PromptSource`, whose stages are
functions of a frozen :class:`~critique_rl.train.step_context.StepContext`; or episodes,
:class:`~critique_rl.agents.source.EpisodeSource`)::

    batch, selection = source.collect(timer)          # sample -> score: RolloutBatch (this process's shard)
    crit = source.critique_and_refine(batch)          # critique/refine: CritiqueResult (or None)
    plan = source.advantages(batch, crit)             # advantages: AdvantagePlan over mixed groups (gathered)
    ub, extra = source.update_batch(batch, crit, plan)   # UpdateBatch: tokens, per-token advantages, teacher
    stats = policy_update(ub); engine.sync_weights()  # update (the engine's own protocol says sleep / TIS)
    metrics = source.step_metrics(...)                # log: merged over processes, written by the main process

The run's state between steps is typed: :class:`~critique_rl.train.selection.SelectionState` (frozen, replaced
by each stage that changes it), the EMA teacher, the step / phase counters and the critic failure watch.
Under ``accelerate launch`` every process runs this loop on its own whole groups; only the main process
writes metrics, rollouts, checkpoints, the summary, plots and the memory bank.
"""

from __future__ import annotations

import json
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import ProjectConfiguration
from rich.progress import Progress

from critique_rl.config import TrainConfig
from critique_rl.model_card import write_model_card
from critique_rl.rollout import Generator, engine_is_separate, engine_sleep
from critique_rl.rollout.factory import build_generator
from critique_rl.train import distributed as dist
from critique_rl.train import prompt_setup, selection_stage, task_mix
from critique_rl.train.batching import enable_fused_head
from critique_rl.train.log_stage import CriticWatch, check_critic, run_totals
from critique_rl.train.metrics import JsonlWriter, plot_curves
from critique_rl.train.phase_state import PhaseInputs, enter_phase, setup_phases
from critique_rl.train.policy_setup import (
    fused_head_wanted,
    load_model,
    prepare_policy,
    reference_and_teacher,
    save_final,
)
from critique_rl.train.prefix_sharing import configure_prefix_sharing
from critique_rl.train.prompt_source import PromptSource, RolloutSource
from critique_rl.train.run_setup import (
    _eval_metrics,
    _progress,
    _Timer,
    cfg_bs,
    console,
    deterministic_mode,
    lr_schedule,
    phase_lr,
    quiet_library_progress,
    start_run,
)
from critique_rl.train.run_state import RunHandles, restore_run_state, resume_point, save_run_state
from critique_rl.train.sampler import PromptSampler
from critique_rl.train.selection import SelectionState
from critique_rl.train.sft_phase import run_sft_phase
from critique_rl.train.step_context import (
    EpisodeRun,
    EpisodeStep,
    Models,
    PromptDraw,
    PromptFormat,
    Scorer,
    StepContext,
)
from critique_rl.train.trackers import flat_config, resolve_trackers, scalars, tracker_init_kwargs
from critique_rl.train.update import NonFiniteGuard, Normalisation, UpdateBatch, policy_update

__all__ = ["CritiqueGRPOTrainer"]

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
        env_spec: train on episodes of this environment (default: ``args.agent.env``'s, when set).
        episode_source: train on episodes from this :class:`~critique_rl.agents.source.EpisodeSource` (its own
            critic and memory bank; ``critique-rl serve`` passes its ``ServerSource``).
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
        env_spec: Any = None,
        episode_source: Any = None,
    ) -> None:
        self.cfg = args or TrainConfig()
        self.episodes: Any = episode_source  # the rollout source on multi-turn episodes; None: prompts
        if episode_source is None and (env_spec is not None or self.cfg.agent.env is not None):
            from critique_rl.agents.registry import get_env_spec
            from critique_rl.agents.source import EpisodeSource

            self.episodes = EpisodeSource(env_spec or get_env_spec(self.cfg.agent.env), critic=critic, bank=memory)
        critic, memory = (None, None) if self.episodes is not None else (critic, memory)  # episodes: the source's
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
        self.selection = SelectionState()  # data selection (frozen, replaced as it changes); checkpointed
        self._critic_watch = CriticWatch()
        self._generator: Generator | None = None

    # ------------------------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------------------------
    def _setup(self, resume: bool) -> Path | None:
        cfg = self.cfg
        self.trackers = resolve_trackers(cfg.report_to)
        self.accelerator = start_run(
            cfg, self.out, log_with=self.trackers or None,
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "tensorboard")),
        )
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        dist.validate_world(cfg.generation_batch_size, cfg.num_generations, cfg.mini_batch_size, self.world)
        if self.episodes is not None:
            self.episodes.check_config(cfg, self.world)
            self.episodes.setup_data(cfg)
        else:
            prompt_setup.setup_prompt_data(self, self._train_arg, self._eval_arg)
        self._nonfinite = NonFiniteGuard(cfg.max_nonfinite_steps)
        resume_from = resume_point(self.out, resume, self.accelerator)
        self.model, self.tokenizer = self._load_model(resume_from)
        if self.episodes is None:
            prompt_setup.setup_prompt_objectives(self, self._reward_arg)
        else:
            self.reward_funcs, self.reward_names, self.reward_weights = [], ["return"], torch.ones(1)
        self.phases, self._phase_rows, self._phase_samplers = setup_phases(cfg)  # + each train_file's rows, sampler
        self._run_rewards = (self.reward_funcs, self.reward_names, self.reward_weights)  # a phase's default
        self._phase, self._phases_done, self._task_blocks = PhaseInputs(None, None, self._run_rewards), 0, []
        self.rng = random.Random(cfg.seed + 1 + 7919 * self.rank)  # refinement choice; checkpointed
        if self.episodes is not None:
            self.sampler = PromptSampler(self.episodes.train_tasks, cfg.seed)
            self._phase_samplers.update(self.episodes.setup_model(EpisodeRun(  # + the phases' own samplers
                self.model, self.tokenizer, self.out, self.rank, self.world, self.is_main,
                self.accelerator.wait_for_everyone), resume_from))
            self.critic, self.memory_hook, self.memory = self.episodes.critic, None, self.episodes.bank
            self.memory_on, self.refines = self.memory is not None, self.critic is not None
        else:
            prompt_setup.setup_prompt_critic_memory(self, resume_from)
        if self.is_main:
            cfg.save_yaml(self.out / "config.yaml")
        if self.trackers:  # accelerate starts them on the main process only
            self.accelerator.init_trackers(cfg.tracker_project, config=flat_config(cfg.to_dict()),
                                           init_kwargs=tracker_init_kwargs(self.trackers, self.out, self.out.name))
        return resume_from

    def _load_model(self, resume_from: Path | None) -> tuple[Any, Any]:
        tiny = self.episodes.build_tiny if self.episodes is not None else lambda: prompt_setup.build_tiny(self)
        return load_model(self.cfg, resume_from, device=self.accelerator.device, out=self.out, model=self._model_arg,
                          tokenizer=self._tokenizer_arg, build_tiny=tiny)  # a method: benchmarks wrap it

    def _run_sft(self, index: int, model: torch.nn.Module, progress: Progress | None) -> None:
        """SFT phase ``index`` on ``model``: the run's rows (with the task's demonstrations, mistakes and
        refinement demos), the environment's scripted episodes, or the phase's ``train_file`` (prompt -> answer)."""
        with self.episodes.weight_update() if self.episodes is not None else nullcontext():  # the source's guard
            self.summary.update(run_sft_phase(self.cfg, self.phases, index, model, self.tokenizer, self._sft_pairs,
                                              progress, self.step, self.summary))

    def _sft_pairs(self, ph: Any, steps: int, first: bool) -> tuple[list[tuple[str, str]], int]:
        if ph.train_file:
            return [(self.prompt_text(r), str(r["answer"])) for r in self._phase_rows[ph.train_file]], steps
        if self.episodes is not None:  # scripted episodes of the environment
            return self.episodes.sft_pairs(self._phases_done), steps
        return prompt_setup.sft_pairs(self, steps, first)

    def prompt_text(self, row: dict[str, Any], context: str | None = None) -> str:
        return PromptFormat(self.tokenizer, self.use_chat, 0).text(row, context)

    def _policy(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    # ------------------------------------------------------------------------------------------------------
    # phases
    # ------------------------------------------------------------------------------------------------------
    def _warmup(self, progress: Progress | None) -> None:
        """The SFT phases before the first rl phase (default: the one warm-up; every process runs the same seeded
        SFT, so all start RL from equal weights), then the held-out evaluation before RL."""
        while self._phases_done < len(self.phases) and self.phases[self._phases_done].kind == "sft":
            self._run_sft(self._phases_done, self.model, progress)
            self._phases_done += 1
        before = self._evaluate()
        self.summary["eval_accuracy_before_rl"] = before["accuracy"]
        if before.get("by_task"):
            self.summary["eval_accuracy_before_rl_by_task"] = before["by_task"]
        if "ece" in before:
            self.summary["eval_ece_before_rl"] = before["ece"]
        self._eval_row0 = self._eval_metrics(before)

    def _eval_metrics(self, result: dict[str, Any]) -> dict[str, Any]:
        return self.episodes.eval_metrics(result) if self.episodes is not None else _eval_metrics(result)

    def sft_completion(self, row: dict[str, Any]) -> str:
        """SFT target of a row: the task's completion format on its own rows, the reference answer on user rows."""
        return self.task.sft_completion(row) if self.task_rows else row["answer"]

    def _evaluate(self) -> dict[str, Any]:
        """Greedy held-out accuracy, each process its share (prompts with a ``brier`` reward: also calibration)."""
        gen = self.generator
        return self.episodes.evaluate(gen) if self.episodes is not None else prompt_setup.evaluate(self, gen)

    def _build_optim(self) -> None:
        cfg = self.cfg
        self.model, lora_summary = prepare_policy(cfg, self.model, self.tokenizer, self.out, self.is_main)
        self.summary.update(lora_summary)  # LoRA adapter on the warmed-up base, gradient checkpointing
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, phase_lr(lr_schedule(cfg), self.phases, cfg.learning_rate))
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(self.model, self.optimizer, self.scheduler)
        self.ref_model, self._ema_teacher = reference_and_teacher(cfg, self._policy(), self.accelerator)
        models = [m for m in (self.model, self.ref_model, self._ema_teacher and self._ema_teacher.model) if m]
        for m in models if fused_head_wanted(cfg, self.model, self.accelerator.device) else ():  # after the copies
            enable_fused_head(m)
        configure_prefix_sharing(models, cfg.prefix_sharing)  # policy, reference and teacher passes + generation
        if engine_is_separate(self.generator) and getattr(self.critic, "shares_policy", False):
            self.critic.generator = self.generator  # self-critique (hf, model: policy) from the synced engine
        if self.world > 1:  # ranks sample different completions (the same seed would correlate them)
            torch.manual_seed(cfg.seed + 1000 * self.rank)

    @property
    def generator(self) -> Generator:
        """The rollout engine (``rollout_backend``, from the engine registry), built on first use and kept: it serves
        rollouts, refinements and evaluation, and gets the weights after every optimizer step. It reads the policy
        through ``self._policy`` at each use (a later LoRA wrap is seen); engine differences are its protocol's."""
        if self._generator is None:
            cfg = self.cfg
            sharded = self.world > 1 and not cfg.lora.enabled  # FSDP / ZeRO-3: full weights gathered for a push
            self._generator = build_generator(
                cfg.rollout_backend, self._policy, self.tokenizer, batch_size=cfg_bs(cfg),
                autocast=self.accelerator.autocast, vllm_config=cfg.vllm, seed=cfg.seed + 1000 * self.rank,
                run_dir=self.out, is_main=self.is_main,
                weights_fn=(lambda: self.accelerator.get_state_dict(self.model)) if sharded else None)
        return self._generator

    # ------------------------------------------------------------------------------------------------------
    # one RL step: the stages
    # ------------------------------------------------------------------------------------------------------

    def _normalisation(self, ub: UpdateBatch) -> Normalisation:
        """Global loss-aggregation counts over the processes (see :class:`Normalisation`)."""
        n = ub.tokens.input_ids.shape[0]
        seqs, toks = dist.all_reduce_sum([float(n), float(ub.tokens.completion_mask.sum().clamp_min(1))])
        micro = dist.all_reduce_max(-(-n // self.cfg.mini_batch_size))
        return Normalisation(seqs / self.world, toks / self.world, micro)

    def _models(self) -> Models:
        teacher = self._ema_teacher.model if self._ema_teacher is not None else None
        return Models(self.model, self._policy(), self.ref_model, teacher, self.accelerator)

    def _context(self) -> StepContext:
        """The frozen context of a single-turn stage: this step's handles and objectives, and its prompt draw
        (an rl phase's own sampler, else the run's: one task at a time under ``task_order``, or a phase's task
        weights)."""
        sampler = self._phase.sampler or self.sampler
        own = sampler is self.sampler
        draw = PromptDraw(sampler, self.sampler, task_mix.task_at(self.step, self._task_blocks)
                          if own and self._task_blocks else None, self._phase.task_weights if own else None)
        scorer = Scorer(self.reward_funcs, self.reward_names, self.reward_weights, self.gates, self.verify,
                        self.use_chat, self.cfg.max_steps)
        return StepContext(cfg=self.cfg, engine=self.generator, critic=self.critic, scorer=scorer,
                           fmt=PromptFormat(self.tokenizer, self.use_chat, self.max_new_tokens), models=self._models(),
                           rank=self.rank, world=self.world, is_main=self.is_main, rng=self.rng, step=self.step,
                           task=self.task, draw=draw, refines=self.refines, sft_completion=self.sft_completion,
                           memory_hook=self.memory_hook, memory_on=self.memory_on)

    @property
    def rollouts(self) -> RolloutSource:
        """This step's rollout source: episodes (the source's view of an :class:`EpisodeStep`) or prompts."""
        if self.episodes is not None:
            return self.episodes.for_step(EpisodeStep(self.step, self._phases_done, self.generator, self._models(),
                                                      self.rng, self.sampler, self.selection,
                                                      getattr(self, "rollout_log", None)))
        return PromptSource(self._context(), self.selection, getattr(self, "rollout_log", None), self.train_rows,
                            self.out)

    def _step(self) -> dict[str, Any]:
        """One RL step: sample -> score -> critique/refine -> advantages -> update -> log. The selection state
        counts the step's samples (``selection/samples``: refills included; episodes: the batch)."""
        src = self.rollouts
        timer = _Timer()
        batch, selection_metrics = src.collect(timer)
        self.selection = self.selection.add_samples(selection_metrics.get("selection/samples",
                                                                          len(batch.rows) * self.world))
        with timer("critique"):
            crit = src.critique_and_refine(batch)
        with timer("prepare"):
            plan = src.advantages(batch, crit)
            ub, extra = src.update_batch(batch, crit, plan)
        with timer("train"), src.weight_update():  # the source's guard around the weight change
            stats = self._update(ub, src.norm_constant())
        metrics = src.step_metrics(batch, crit, plan, {**extra, **stats, **timer.total()}, selection_metrics)
        src.log_rollouts(batch, plan, crit)
        return metrics

    def _update(self, ub: UpdateBatch | None, norm_constant: float) -> dict[str, Any]:
        """The optimizer update on ``ub``, then the engine's weights and the EMA teacher follow the policy. The
        engine is asked (its protocol) whether it frees memory for the update and whether its log-probs differ
        from the trained module's (then truncated importance sampling applies)."""
        if ub is None:  # nothing to learn from this step (e.g. no episode fit its first prompt)
            return {"loss/total": None}
        engine = self.generator
        engine_sleep(engine)  # a colocated engine frees its memory for the update
        stats = policy_update(self.model, self.optimizer, self.scheduler, self.accelerator, ub, self.cfg,
                              norm_constant=norm_constant, norm=self._normalisation(ub), guard=self._nonfinite,
                              importance_weights=engine_is_separate(engine))
        engine.sync_weights()
        if self._ema_teacher is not None:
            self._ema_teacher.update(self._policy())
        return stats

    # ------------------------------------------------------------------------------------------------------
    # data selection between steps, records, checkpoints
    # ------------------------------------------------------------------------------------------------------
    def _measure_pass_rates(self) -> dict[str, Any]:
        info, self.selection = self.rollouts.measure_pass_rates()  # the source's pool: prompts or episode tasks
        return info

    def _order_tasks(self) -> dict[str, Any]:
        """The task order (``task_order``) and the RL steps of each, fixed as RL starts."""
        info, self.selection = selection_stage.order_tasks(self._context(), self.train_rows, self.selection)
        self._task_blocks = task_mix.task_blocks(self.selection.task_order, self.cfg.tasks, self.cfg.max_steps)
        self.summary.update(selection_stage.task_order_summary(self.selection, self._task_blocks, self.is_main))
        return info

    def _write_metrics(self, row: dict[str, Any]) -> None:
        if self.is_main:
            self.metrics_log.write(row)
        if self.trackers:  # the same scalars under the same names and step
            self.accelerator.log(scalars(row), step=int(row["step"]))

    def _run_handles(self) -> RunHandles:
        return RunHandles(self.optimizer, self.scheduler, self.sampler, self._phase_samplers, self.rng, self.critic,
                          self._ema_teacher)

    def _save(self) -> None:
        """A checkpoint, written by the main process (every process's RNG state gathered into it)."""
        self.summary["wall_seconds_before_resume"] = self._wall_prior + time.perf_counter() - self._t_start
        extra = {"memory.sqlite": self.memory_hook.snapshot} if self.memory_hook is not None else None
        if self.episodes is not None:
            extra = self.episodes.checkpoint_files()
        save_run_state(self.out / "checkpoints", self.step, self._run_handles(), policy=self._policy(),
                       tokenizer=self.tokenizer, summary=self.summary, selection=self.selection,
                       phases_done=self._phases_done, world=self.world, is_main=self.is_main,
                       keep=self.cfg.keep_checkpoints, extra_files=extra)
        self.accelerator.wait_for_everyone()

    def _restore(self, path: Path) -> None:
        r = restore_run_state(path, self._run_handles(), world=self.world, rank=self.rank, phases=self.phases)
        self.step, self.summary, self.selection, self._phases_done = r.step, r.summary, r.selection, r.phases_done
        self._wall_prior, self._critic_watch = r.wall_prior, CriticWatch(r.critic_errors_seen)

    # ------------------------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------------------------
    def train(self, resume: bool = False) -> dict[str, Any]:
        """Run SFT warm-up (unless resuming), RL for ``max_steps``, and write the run directory."""
        with quiet_library_progress(), deterministic_mode(self.cfg.deterministic):
            try:
                return self._train(resume)
            finally:  # flush and close the trackers, on success and on errors alike
                if getattr(self, "trackers", None):
                    self.accelerator.end_training()

    def _train(self, resume: bool) -> dict[str, Any]:
        t_start = self._t_start = time.perf_counter()
        self._wall_prior = 0.0
        resume_from = self._setup(resume)
        self.metrics_log = JsonlWriter(self.out / "metrics.jsonl") if self.is_main else None
        self.rollout_log = JsonlWriter(self.out / "rollouts.jsonl") if self.is_main else None
        progress = _progress() if self.cfg.progress and self.is_main else None
        with progress or nullcontext():
            if resume_from is None:
                self._warmup(progress)
            self._build_optim()
            if resume_from is None:
                if self.cfg.pass_rate_filter.enabled:  # difficulty measured on the warmed-up policy, before RL
                    self._eval_row0.update(self._measure_pass_rates())
                if self.cfg.tasks and self.cfg.task_order != "joint":  # the task order, fixed when RL starts
                    self._eval_row0.update(self._order_tasks())
                self._write_metrics({"step": 0, **self._eval_row0})
            if resume_from is not None:
                self._restore(resume_from)
                if self.selection.task_order:
                    self._task_blocks = task_mix.task_blocks(self.selection.task_order, self.cfg.tasks,
                                                             self.cfg.max_steps)
                if self.is_main:
                    self.metrics_log.truncate_after_step(self.step)
                    self.rollout_log.truncate_after_step(self.step)
                    console.print(f"resumed from {resume_from} at step {self.step}")
            task_id = progress.add_task("RL", total=self.cfg.max_steps, completed=self.step) if progress else None
            rl_end = 0
            for index, phase in enumerate(self.phases):
                rl_end += (phase.steps or 0) if phase.kind == "rl" else 0
                if index < self._phases_done:
                    continue
                if phase.kind == "sft":  # a later SFT phase: on the live policy; the engine gets the new weights
                    self._run_sft(index, self._policy(), progress)
                    self.generator.sync_weights()
                else:
                    self._phase = enter_phase(self.cfg, phase, self._phase_samplers, getattr(self, "task", None),
                                              self._run_rewards)  # the phase's data and objectives
                    self.reward_funcs, self.reward_names, self.reward_weights = self._phase.rewards
                    self._rl_until(rl_end, progress, task_id)
                self._phases_done = index + 1
                if index < len(self.phases) - 1 and (phase.kind == "sft" or self.step % self.cfg.checkpoint_every):
                    self._save()  # a phase boundary is a checkpoint (a crash inside the next phase resumes here)
        return self._finish(t_start)

    def _rl_until(self, end: int, progress: Progress | None, task_id: Any) -> None:
        """RL steps until the run's step reaches ``end`` (the end of the current rl phase)."""
        budget = self.cfg.sample_budget
        while self.step < end:
            if budget is not None and self.selection.samples_total >= budget:
                self.summary["stopped_at_sample_budget"] = self.selection.samples_total
                return
            refresh = self.cfg.pass_rate_filter.refresh_every
            measured = self._measure_pass_rates() if (self.cfg.pass_rate_filter.enabled and refresh
                                                      and self.step and self.step % refresh == 0) else {}
            if not measured and self.episodes is not None and self.rollouts.measures_new_pool():
                measured = self._measure_pass_rates()  # an rl phase with its own tasks starts: its pool first
            metrics = self._step()
            metrics.update(measured)
            if self.cfg.phases:
                metrics["phase"] = self._phases_done
            self.step += 1
            self._critic_watch = check_critic(self._critic_watch, metrics, self.critic, self.cfg, self.step,
                                              self.is_main)
            if self.cfg.eval_every and self.step % self.cfg.eval_every == 0 and self.step < self.cfg.max_steps:
                metrics.update(self._eval_metrics(self._evaluate()))
            self._write_metrics(metrics)
            if progress:
                progress.update(task_id, advance=1, description=(
                    f"RL acc {metrics['train/accuracy']:.2f} loss {metrics['loss/total']:+.3f}"))
            if self.step % self.cfg.checkpoint_every == 0:
                self._save()

    def _finish(self, t_start: float) -> dict[str, Any]:
        final = self._evaluate()
        if self.episodes is not None:
            self.summary.update(self.episodes.final_summary(final, self.step,
                                                            self._wall_prior + time.perf_counter() - t_start))
        else:
            prompt_setup.prompt_summary(self, final, self._wall_prior + time.perf_counter() - t_start)
        if self.world > 1:
            self.summary["num_processes"] = self.world
        cfg = self.cfg
        if (cfg.dynamic_sampling.enabled or cfg.pass_rate_filter.enabled or cfg.low_variance_filter.enabled
                or cfg.sample_budget is not None):
            self.summary["samples_generated"] = self.selection.samples_total
            if self.selection.pass_rate:
                self.summary["pass_rate_filter"] = self.selection.pass_rate
        if self.step % self.cfg.checkpoint_every != 0 and self.step > 0:
            self._save()
        if self.is_main:
            self.summary.update(run_totals(self.out / "metrics.jsonl", self.memory))
            self._write_metrics({"step": self.step, **self._eval_metrics(final), "final": True})
            self.metrics_log.close()
            self.rollout_log.close()
            save_final(self.cfg, self._policy(), self.tokenizer, self.step, self.out / "final")
            plot_curves(self.out / "metrics.jsonl", self.out / "curves.png")
            (self.out / "summary.json").write_text(json.dumps(self.summary, indent=2))
            write_model_card(self.out)
        self.summary = dist.broadcast_object(self.summary)
        self.accelerator.wait_for_everyone()
        return self.summary


