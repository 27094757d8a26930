"""The training loop: SFT warm-up, then GRPO / Critique-GRPO steps, evaluation, checkpoints.

Read top to bottom: ``train()`` -> ``_setup`` -> ``_warmup`` -> loop of ``_step`` -> ``_finish``.
One step is a pipeline over typed values (:mod:`critique_rl.train.rollout_batch`)::

    rows, contexts = next_prompts()          # this process's shard of the global prompt batch (+ memory)
    batch = score(sample(rows, contexts))    # RolloutBatch: n completions per prompt, rewards, gates
    crit = critique_and_refine(batch)        # CritiqueResult (or None): critiques, refinements, their rewards
    plan = advantages(batch, crit)           # AdvantagePlan over mixed groups (gathered over processes)
    ub = update_batch(batch, crit, plan)     # UpdateBatch: tokens, per-token advantages, distillation, reference
    stats = policy_update(ub); generator.sync_weights()
    metrics = log(batch, crit, plan, stats)  # merged over processes, written by the main process

Under ``accelerate launch`` every process runs this loop on its own whole groups; only the main process
writes metrics, rollouts, checkpoints, the summary, plots and the memory bank.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType, ProjectConfiguration
from rich.progress import (
    Progress,
)

from critique_rl.config import TrainConfig
from critique_rl.data import DataOptions, load_rows, load_split
from critique_rl.errors import ConfigError, UserError
from critique_rl.model_card import write_model_card
from critique_rl.models import (
    build_tiny_model,
    build_tiny_tokenizer,
    format_prompt,
    load_policy,
    wants_chat_template,
)
from critique_rl.rewards import (
    TrainerState,
    Verifier,
    build_gates,
    build_reward_funcs,
    evaluate_gates,
    func_name,
    reward_inputs,
    score_rewards,
)
from critique_rl.rewards.builtin import parse_confidence
from critique_rl.rollout import Completion, SamplingParams
from critique_rl.rollout.factory import build_generator
from critique_rl.tasks import Task, get_task, load_callable
from critique_rl.templates import check_templates
from critique_rl.train import checkpoint as ckpt
from critique_rl.train import distributed as dist
from critique_rl.train import task_mix
from critique_rl.train.batching import enable_fused_head, fused_head_supported
from critique_rl.train.critique_path import CritiquePathMixin
from critique_rl.train.critique_step import (
    refinement_demos,
)
from critique_rl.train.ema import EmaTeacher
from critique_rl.train.evaluate import EVAL_SEED, greedy_records, summarise_records
from critique_rl.train.metrics import JsonlWriter, plot_curves
from critique_rl.train.prompt_selection import PromptSelectionMixin
from critique_rl.train.records import RecordsMixin
from critique_rl.train.rollout_batch import RolloutBatch
from critique_rl.train.run_setup import (  # noqa: F401  (the names trainer.py always had)
    CRITIC_MIN_REQUESTS,
    LORA_BASE_DIR,
    _critic_counts,
    _eval_metrics,
    _progress,
    _restore_critic_counts,
    _Timer,
    cfg_bs,
    check_device,
    check_output_dir,
    console,
    deterministic_mode,
    lr_schedule,
    quiet_library_progress,
    resolve_mixed_precision,
    seed_everything,
    start_run,
    summary_table,
)
from critique_rl.train.sampler import MixtureSampler, PromptSampler
from critique_rl.train.sft import refine_added_steps, sft_warmup
from critique_rl.train.trackers import flat_config, resolve_trackers, tracker_init_kwargs
from critique_rl.train.update import NonFiniteGuard, Normalisation, UpdateBatch, policy_update

__all__ = ["EVAL_SEED", "CritiqueGRPOTrainer", "resolve_mixed_precision", "summary_table"]

def _kwargs_for(names: list[Any], reward_kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
    """The part of ``reward_kwargs`` that belongs to ``names`` (the run's kwargs may name functions a phase
    or a single build does not include)."""
    picked = {k: v for k, v in (reward_kwargs or {}).items() if k in names}
    return picked or None


class CritiqueGRPOTrainer(CritiquePathMixin, RecordsMixin, PromptSelectionMixin):
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
        self.task: Task = get_task(cfg.task)
        self.verify = Verifier(load_callable(cfg.verifier) if cfg.verifier else self.task.verify, cfg.reward_threshold)
        if cfg.verifier:  # built-in rewards, gates and critiques judge by the user's verifier too
            self.task = copy.copy(self.task)
            self.task.verify = self.verify
            self.task.parts = {k: dataclasses.replace(t, verify=self.verify) for k, t in self.task.parts.items()}
        self.train_rows = self._rows(self._train_arg, cfg.train_file, "train", cfg.sft_examples)
        self.eval_rows = self._rows(self._eval_arg, cfg.eval_file, "eval", cfg.eval_n)[: cfg.eval_n]
        for split, rows in (("training", self.train_rows), ("held-out", self.eval_rows)) if cfg.tasks else ():
            i = next((i for i, r in enumerate(rows) if r.get("task") not in cfg.tasks), None)
            if i is not None:
                raise ConfigError("tasks", cfg.tasks, f"{split} row {i + 1} has task {rows[i].get('task')!r}; with "
                                  "`tasks` every row needs a `task` column naming one of them")
        # task-specific SFT helpers (the task's mistake, its completion format) only on the task's own rows
        self._task_rows = self._train_arg is None and not cfg.train_file and not cfg.dataset_name
        check_templates(cfg.critic.template_dir)
        self._nonfinite = NonFiniteGuard(cfg.max_nonfinite_steps)
        self._critic_errors_seen = 0.0
        warn = (lambda msg: console.print(f"[bold yellow]warning: {msg}[/]", soft_wrap=True, markup=True)) \
            if self.accelerator.is_main_process else None
        resume_from = ckpt.resume_checkpoint(self.out / "checkpoints", warn=warn) if resume else None
        if not resume and ckpt.latest_checkpoint(self.out / "checkpoints") is not None:
            raise UserError(f"output_dir '{self.out}' already holds checkpoints of an earlier run; pass --resume to "
                            "continue it, or choose another --output-dir (or delete the folder)")
        self.accelerator.wait_for_everyone()  # every rank has looked before the main process changes anything
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if resume_from is None:  # a fresh run owns its logs
                for name in ("metrics.jsonl", "rollouts.jsonl"):
                    (self.out / name).unlink(missing_ok=True)

        self.model, self.tokenizer = self._load_model(resume_from)
        self.use_chat = wants_chat_template(self.tokenizer, cfg.use_chat_template)
        self.verify.conversational = self.use_chat
        self.max_new_tokens = cfg.max_new_tokens or self.task.max_new_tokens
        self._check_lengths()
        funcs = self._reward_arg if self._reward_arg is not None else cfg.reward_funcs
        self.reward_funcs = [
            f if callable(f) else build_reward_funcs([f], self.task, _kwargs_for([f], cfg.reward_kwargs))[0] for f in funcs
        ]
        self.reward_names = [func_name(f) for f in self.reward_funcs]
        self.gates = build_gates(cfg.gates, self.task, cfg.gate_kwargs)
        weights = cfg.reward_weights or [1.0] * len(self.reward_funcs)
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)

        # same state on every rank: global batches
        try:
            self.sampler = MixtureSampler(self.train_rows, cfg.tasks, cfg.seed) if cfg.tasks else \
                PromptSampler(self.train_rows, cfg.seed)
        except ValueError as exc:  # a task without training rows
            raise ConfigError("tasks", cfg.tasks, f"{exc}; give every task some rows, or leave it out") from None
        self._task_blocks: list[tuple[str, int, int]] = []
        self._setup_phases()
        self.rng = random.Random(cfg.seed + 1 + 7919 * self.rank)  # refinement choice; checkpointed
        self._selection: dict[str, Any] = {"samples_total": 0, "pass_rate": None}  # data selection; checkpointed
        if cfg.refinement_source == "reference":  # the control arm: reference answers, no critic at all
            self.critic = None
        elif self.critic is None and cfg.critic.backend != "none" and cfg.critique_on != "none":
            from critique_rl.critics import build_critic

            self.critic = build_critic(cfg.critic, policy=self.model, tokenizer=self.tokenizer, output_dir=self.out)
        if cfg.critique_on == "none":
            self.critic = None
        # groups get an off-policy sample: a refinement from a critique, or (control) the reference answer
        self._refines = self.critic is not None or (cfg.refinement_source == "reference" and cfg.critique_on != "none")
        self.memory_on = self.memory is not None or cfg.memory.enabled
        self.memory_hook = self._build_memory(resume_from) if self.is_main else None
        if self.is_main:
            cfg.save_yaml(self.out / "config.yaml")
        if self.trackers:  # accelerate starts them on the main process only
            self.accelerator.init_trackers(cfg.tracker_project, config=flat_config(cfg.to_dict()),
                                           init_kwargs=tracker_init_kwargs(self.trackers, self.out, self.out.name))
        return resume_from

    def _setup_phases(self) -> None:
        """The schedule (``phases``, or sft + rl), each phase's own data (a sampler per ``train_file``, seeded
        like the run's) and objectives (reward functions and weights)."""
        cfg = self.cfg
        self.phases = cfg.schedule()
        self._phases_done = 0
        self._phase_sampler: PromptSampler | None = None
        self._phase_task_weights: dict[str, float] | None = None
        self._phase_rows: dict[str, list[dict[str, Any]]] = {}
        self._phase_samplers: dict[str, PromptSampler] = {}
        for i, ph in enumerate(self.phases):
            if ph.train_file and ph.train_file not in self._phase_rows:
                self._phase_rows[ph.train_file] = load_rows(ph.train_file, field=f"phases[{i}].train_file",
                                                            options=DataOptions.from_config(cfg))
                self._phase_samplers[ph.train_file] = PromptSampler(self._phase_rows[ph.train_file], cfg.seed)
        self._run_rewards = (self.reward_funcs, self.reward_names, self.reward_weights)

    def _enter_phase(self, index: int) -> None:
        """Make phase ``index``'s data and objectives current (rl phases)."""
        ph = self.phases[index]
        self._phase_sampler = self._phase_samplers.get(ph.train_file) if ph.train_file else None
        self._phase_task_weights = ph.tasks  # a phase's own mix of the run's tasks (None = the run's weights)
        if ph.reward_funcs is None and ph.reward_weights is None:
            self.reward_funcs, self.reward_names, self.reward_weights = self._run_rewards
            return
        funcs = (self._run_rewards[0] if ph.reward_funcs is None else
                 build_reward_funcs(list(ph.reward_funcs), self.task,
                                    _kwargs_for(list(ph.reward_funcs), self.cfg.reward_kwargs)))
        weights = ph.reward_weights or (self.cfg.reward_weights if ph.reward_funcs is None else None) \
            or [1.0] * len(funcs)
        self.reward_funcs, self.reward_names = funcs, [func_name(f) for f in funcs]
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)

    def _phase_name(self, index: int) -> str:
        ph = self.phases[index]
        return ph.name or f"{ph.kind}{index}"

    def _run_sft(self, index: int, model: torch.nn.Module, progress: Progress | None) -> None:
        """SFT phase ``index`` on ``model``: the run's rows (with the task's demonstrations, mistakes and
        refinement demos) or the phase's ``train_file`` (prompt -> answer). Seeded: the first phase by the run
        seed (the warm-up of earlier releases), later ones by seed + 1000 x index, so a rerun repeats it."""
        cfg, ph = self.cfg, self.phases[index]
        steps = ph.steps or 0
        if steps <= 0:
            return
        first = index == 0
        lr = ph.learning_rate if ph.learning_rate is not None else cfg.sft_learning_rate
        seed = cfg.seed if first else cfg.seed + 1000 * index
        label = "SFT warm-up" if first else f"SFT {self._phase_name(index)}"
        task_id = progress.add_task(label, total=steps) if progress else None
        t0 = time.perf_counter()
        if ph.train_file:
            pairs = [(self.prompt_text(r), str(r["answer"])) for r in self._phase_rows[ph.train_file]]
        else:
            pairs = [(self.prompt_text(r), self._demonstration(r)) for r in self.train_rows]
            if cfg.sft_refine_fraction > 0:
                plain = len(pairs)
                pairs += [(self.prompt_text({"prompt": p}), c) for p, c in refinement_demos(
                    self._sft_task(), self.train_rows, cfg.sft_refine_fraction, cfg.seed, self._sft_completion,
                    cfg.critic.template_dir)]
                if cfg.sft_refine_steps == "added" and first:  # batches are drawn in proportion to the pairs
                    steps = refine_added_steps(steps, plain, len(pairs) - plain)
                    if progress:
                        progress.update(task_id, total=steps)
                    self.summary["sft_steps_run"] = steps
        losses = sft_warmup(
            model, self.tokenizer, pairs,
            steps=steps, batch_size=cfg.sft_batch_size, lr=lr, seed=seed,
            on_step=(lambda s, loss: progress.update(task_id, advance=1, description=f"SFT loss {loss:.3f}"))
            if progress else None,
        )
        self.summary["sft_final_loss"] = losses[-1]
        self.summary["sft_seconds"] = self.summary.get("sft_seconds", 0.0) * (not first) + time.perf_counter() - t0
        if cfg.phases:
            self.summary.setdefault("phases", []).append(
                {"phase": index, "name": self._phase_name(index), "kind": "sft", "steps": steps,
                 "at_rl_step": self.step, "final_loss": losses[-1]})

    def _build_memory(self, resume_from: Path | None) -> Any:
        cfg = self.cfg
        if not self.memory_on:
            return None
        from critique_rl.memory import MemoryBank
        from critique_rl.train.memory_hook import MemoryHook

        bank_path = Path(cfg.memory.bank_path or self.out / "memory.sqlite")
        given = self.memory is not None
        if resume_from is not None and not given:  # bank and model go back to the same step
            MemoryHook.restore(resume_from / "memory.sqlite", bank_path)
        elif not given and MemoryHook.begin_fresh_run(bank_path, self.out):
            console.print(f"[bold yellow]warning: {self.out} was started before and has no checkpoint to resume; "
                          f"the memory bank {bank_path} was put back to how it was when the run first started[/]",
                          soft_wrap=True)
        if not given:
            self.memory = MemoryBank(bank_path, config=cfg.memory, critic=self.critic)
        mem_cfg = cfg.memory if cfg.memory.enabled else dataclasses.replace(cfg.memory, enabled=True)  # memory= given
        hook = MemoryHook(self.memory, mem_cfg, self.task.name, run_name=self.out.name, critic=self.critic)
        if resume_from is not None and given:
            hook.restore_open(resume_from)
        return hook

    def _rows(self, given: Any, path: str | None, split: str, n: int) -> list[dict[str, Any]]:
        rows = load_split(self.cfg, split, given)  # train/eval_file, dataset_name, the *_column fields
        if rows is not None:
            return rows
        seed = EVAL_SEED if split == "eval" else self.cfg.seed
        return self.task.make_examples(split, n, seed)

    def _weights_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.cfg.weights_dtype == "bfloat16" else torch.float32

    def _load_model(self, resume_from: Path | None):
        cfg = self.cfg
        dev = str(self.accelerator.device.type)
        if resume_from is not None:
            if cfg.lora.enabled:
                from critique_rl.lora import load_adapter

                base, tok = load_policy(self.out / LORA_BASE_DIR, device=dev, dtype=self._weights_dtype())
                return load_adapter(base, resume_from / "model", trainable=True), tok
            return load_policy(resume_from / "model", device=dev, dtype=self._weights_dtype())
        if not isinstance(self._model_arg, str):
            if self._tokenizer_arg is None:
                raise UserError("pass tokenizer= together with a loaded model object")
            return self._model_arg.to(self.accelerator.device), self._tokenizer_arg
        if self._model_arg == "tiny":
            texts = [r["prompt"] + self._sft_completion(r) for r in self.train_rows[:4000]]
            texts += [p + c for p, c in refinement_demos(self._sft_task(), self.train_rows[:500], 1.0, cfg.seed,
                                                         self._sft_completion, cfg.critic.template_dir)]
            tok = build_tiny_tokenizer(texts, cfg.tiny_vocab_size)
            model = build_tiny_model(tok, cfg.tiny_hidden_size, cfg.tiny_layers, cfg.tiny_heads, seed=cfg.seed)
            return model.to(self._weights_dtype()).to(self.accelerator.device), tok
        return load_policy(self._model_arg, device=dev, dtype=self._weights_dtype())

    def prompt_text(self, row: dict[str, Any], context: str | None = None) -> str:
        prompt = row["prompt"]
        text = prompt if not context else (prompt.with_context(context) if hasattr(prompt, "with_context")
                                           else f"{context}\n{prompt}")
        return format_prompt(self.tokenizer, text, self.use_chat)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _fused_head(self) -> bool:
        """``fused_lm_head``: ``auto`` = on a GPU, when the model's logits are a plain projection."""
        mode, supported = self.cfg.fused_lm_head, fused_head_supported(self.model)
        if mode == "on" and not supported:
            raise ConfigError("fused_lm_head", "on", f"{type(self._policy_module()).__name__} scales or soft-caps "
                              "its logits; use auto or off")
        return mode == "on" or (mode == "auto" and supported and self.accelerator.device.type == "cuda")

    def _policy_module(self) -> Any:
        """The transformers model itself (below a peft wrapper, if any)."""
        from critique_rl.lora import is_lora

        return self.model.get_base_model() if is_lora(self.model) else self.model

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
        self._eval_row0 = _eval_metrics(before)

    def _demonstration(self, row: dict[str, Any]) -> str:
        """SFT target: the task's completion, or its typical mistake at ``sft_mistake_rate`` (seeded per row)."""
        rate, mistake = self.cfg.sft_mistake_rate, self._sft_task().mistake
        if rate > 0 and mistake is not None:
            wrong = mistake(row)
            if wrong is not None and random.Random(f"{self.cfg.seed}:{row['prompt']}").random() < rate:
                return wrong
        return self._sft_completion(row)

    def _sft_task(self) -> Task:
        """The task for SFT helpers: itself on its own generated rows; without its typical mistake on user rows
        (a train_file or train_dataset need not hold the columns the mistake reads, e.g. addition's `a`, `b`)."""
        if self._task_rows:
            return self.task
        parts = {k: dataclasses.replace(t, mistake=None) for k, t in self.task.parts.items()}  # a mixture's too
        return dataclasses.replace(self.task, mistake=None, parts=parts)

    def _sft_completion(self, row: dict[str, Any]) -> str:
        """SFT target of a row: the task's completion format on its own rows, the reference answer on user rows."""
        return self.task.sft_completion(row) if self._task_rows else row["answer"]

    def _check_lengths(self) -> None:
        """Every prompt plus ``max_new_tokens`` must fit the model's positions (a 1 MB prompt is a one-line error,
        not an allocator failure in the middle of a step)."""
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        if not isinstance(limit, int) or limit <= 0:
            return
        field = "max_new_tokens" if self.cfg.max_new_tokens else "task"
        if self.max_new_tokens >= limit:
            raise ConfigError(field, self.cfg.max_new_tokens or self.cfg.task,
                              f"completions of {self.max_new_tokens} tokens do not fit the model's {limit} positions; "
                              f"use max_new_tokens < {limit}")
        for split, rows, source in (("train", self.train_rows, self.cfg.train_file or "train_dataset"),
                                    ("eval", self.eval_rows, self.cfg.eval_file or "eval_dataset")):
            for start in range(0, len(rows), 1024):
                chunk = rows[start:start + 1024]
                ids = self.tokenizer([self.prompt_text(r) for r in chunk], add_special_tokens=False)["input_ids"]
                for i, x in enumerate(ids):
                    if len(x) + self.max_new_tokens > limit:
                        raise UserError(
                            f"{split} data ({source}) row {start + i + 1}: the prompt is {len(x)} tokens; with "
                            f"max_new_tokens {self.max_new_tokens} it does not fit the model's {limit} positions; "
                            "shorten or drop the row (or lower max_new_tokens)")

    def _evaluate(self) -> dict[str, Any]:
        """Greedy held-out accuracy; with a ``brier`` reward in use, also calibration (ECE, Brier score, AUROC).
        Each process decodes its share of the held-out rows; the records are gathered before summarising."""
        gen = self._vllm_engine() if self.cfg.rollout_backend == "vllm" else build_generator(
            "hf", self._policy(), self.tokenizer, batch_size=cfg_bs(self.cfg), autocast=self.accelerator.autocast)
        conf = parse_confidence if "brier" in self.reward_names else None
        n = len(self.eval_rows)
        mine = self.eval_rows[self.rank * n // self.world : (self.rank + 1) * n // self.world]
        records = greedy_records(gen, mine, self.prompt_text, self.verify, self.max_new_tokens,
                                 batch_size=self.cfg.eval_batch_size, confidence_fn=conf)
        records = [r for part in dist.gather_objects(records) for r in part]  # rank order = eval_rows order
        result = summarise_records(records, conf is not None)
        by_task = task_mix.accuracy_by_task(self.eval_rows, [r[0] for r in records])
        if by_task:
            result["by_task"] = by_task
        return result

    def _build_optim(self) -> None:
        cfg = self.cfg
        if cfg.lora.enabled:
            from critique_rl.lora import apply_lora, is_lora, trainable_parameter_summary

            if not is_lora(self.model):  # a fresh run: freeze the (warmed-up) base, train an adapter on it
                if self.is_main:
                    self.model.save_pretrained(self.out / LORA_BASE_DIR)
                    self.tokenizer.save_pretrained(self.out / LORA_BASE_DIR)
                self.model = apply_lora(self.model, cfg.lora)
            self.summary["lora_trainable_parameters"] = trainable_parameter_summary(self.model)["trainable"]
        if cfg.gradient_checkpointing:
            m = self._policy_module()
            if hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5.20 name
                m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if cfg.lora.enabled:  # frozen embeddings: the checkpointed blocks still need an input with grad
                self._policy_module().enable_input_require_grads()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._phase_lr(lr_schedule(cfg)))
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(self.model, self.optimizer, self.scheduler)
        self.ref_model = None
        if cfg.kl_beta > 0 and not cfg.lora.enabled:  # with LoRA the reference is the base, adapter disabled
            self.ref_model = copy.deepcopy(self._policy()).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
        self._ema_teacher = None
        if cfg.distill_weight > 0 and cfg.distill_teacher == "ema":  # stabilised self-teacher (SDPO)
            if self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
                raise UserError("distill_teacher: ema keeps a full copy of the policy and needs unsharded weights; "
                                "use it on one process or with DDP, or distill_teacher: current under FSDP/ZeRO")
            self._ema_teacher = EmaTeacher(self._policy(), cfg.distill_teacher_ema)
        if self._fused_head():  # after the reference copy: each model gets its own patched forward
            enable_fused_head(self.model)
            if self.ref_model is not None:
                enable_fused_head(self.ref_model)
            if self._ema_teacher is not None:
                enable_fused_head(self._ema_teacher.model)
        self.generator = self._vllm_engine() if cfg.rollout_backend == "vllm" else build_generator(
            "hf", self._policy(), self.tokenizer, batch_size=cfg_bs(cfg), autocast=self.accelerator.autocast)
        if cfg.rollout_backend == "vllm" and getattr(self.critic, "shares_policy", False):
            self.critic.generator = self.generator  # self-critique (hf, model: policy) from the synced engine
        if self.world > 1:  # ranks sample different completions (the same seed would correlate them)
            torch.manual_seed(cfg.seed + 1000 * self.rank)

    def _phase_lr(self, schedule: Any) -> Any:
        """The run's LR schedule, scaled inside each rl phase by its ``learning_rate / learning_rate`` (the
        schedule itself runs over all RL steps). Unchanged when no phase sets a rate."""
        ends, factors, end = [], [], 0
        for ph in self.phases:
            if ph.kind == "rl":
                end += ph.steps or 0
                ends.append(end)
                factors.append(1.0 if ph.learning_rate is None else ph.learning_rate / self.cfg.learning_rate)
        if all(f == 1.0 for f in factors):
            return schedule

        def scaled(s: int) -> float:
            i = next((j for j, e in enumerate(ends) if s < e), len(ends) - 1)
            return schedule(s) * factors[i]

        return scaled

    def _vllm_engine(self) -> Any:
        """The vLLM engine (``rollout_backend: vllm``), built on first use (after the SFT warm-up) and kept: it
        serves rollouts, refinements and evaluation, and gets the weights after every optimizer step. It reads
        the policy through ``self._policy`` at each sync, so a LoRA wrap after it was built is seen (merged)."""
        if getattr(self, "_vllm", None) is None:
            cfg = self.cfg
            sharded = self.world > 1 and not cfg.lora.enabled  # FSDP / ZeRO-3: full weights gathered for the push
            self._vllm = build_generator(
                "vllm", self._policy, self.tokenizer, batch_size=cfg_bs(cfg), vllm_config=cfg.vllm,
                seed=cfg.seed + 1000 * self.rank, workdir=self.out if cfg.vllm.mode == "server" else None,
                is_main=self.is_main,
                weights_fn=(lambda: self.accelerator.get_state_dict(self.model)) if sharded else None)
        return self._vllm

    # ------------------------------------------------------------------------------------------------------
    # one RL step: the stages
    # ------------------------------------------------------------------------------------------------------
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

    def _normalisation(self, ub: UpdateBatch) -> Normalisation:
        """Global loss-aggregation counts over the processes (see :class:`Normalisation`)."""
        n = ub.tokens.input_ids.shape[0]
        seqs, toks = dist.all_reduce_sum([float(n), float(ub.tokens.completion_mask.sum().clamp_min(1))])
        micro = dist.all_reduce_max(-(-n // self.cfg.mini_batch_size))
        return Normalisation(seqs / self.world, toks / self.world, micro)

    def _step(self) -> dict[str, Any]:
        cfg = self.cfg
        timer = _Timer()
        batch, selection_metrics = self._collect_batch(timer)
        with timer("critique"):
            crit = self._critique_and_refine(batch) if self._refines else None
        with timer("prepare"):
            plan = self._advantages(batch, crit)
            ub, distill_metrics = self._update_batch(batch, crit, plan)
        with timer("train"):
            getattr(self.generator, "sleep", lambda: None)()  # a colocated engine frees its memory for the update
            stats = policy_update(self.model, self.optimizer, self.scheduler, self.accelerator, ub, cfg,
                                  norm_constant=float(self.max_new_tokens), norm=self._normalisation(ub),
                                  guard=self._nonfinite)
            self.generator.sync_weights()
            if self._ema_teacher is not None:
                self._ema_teacher.update(self._policy())
        metrics = self._metrics(batch, crit, plan)
        metrics.update(distill_metrics)
        metrics.update(stats)
        metrics.update(timer.total())
        metrics = dist.merge_metrics(dist.gather_objects(metrics))
        metrics.update(self._global_metrics(batch, plan))
        metrics.update(selection_metrics)
        metrics.update(self._memory_update(batch, crit))
        self._log_rollouts(batch, plan, crit)
        return metrics

    # ------------------------------------------------------------------------------------------------------
    # metrics and logs
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
                if self._selection.get("task_order"):
                    self._task_blocks = task_mix.task_blocks(self._selection["task_order"], self.cfg.tasks,
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
                    self._enter_phase(index)
                    self._rl_until(rl_end, progress, task_id)
                self._phases_done = index + 1
                if index < len(self.phases) - 1 and (phase.kind == "sft" or self.step % self.cfg.checkpoint_every):
                    self._save()  # a phase boundary is a checkpoint (a crash inside the next phase resumes here)
        return self._finish(t_start)

    def _rl_until(self, end: int, progress: Progress | None, task_id: Any) -> None:
        """RL steps until the run's step reaches ``end`` (the end of the current rl phase)."""
        budget = self.cfg.sample_budget
        while self.step < end:
            if budget is not None and self._selection["samples_total"] >= budget:
                self.summary["stopped_at_sample_budget"] = self._selection["samples_total"]
                return
            refresh = self.cfg.pass_rate_filter.refresh_every
            measured = self._measure_pass_rates() if (self.cfg.pass_rate_filter.enabled and refresh
                                                      and self.step and self.step % refresh == 0) else {}
            metrics = self._step()
            metrics.update(measured)
            if self.cfg.phases:
                metrics["phase"] = self._phases_done
            self.step += 1
            self._check_critic(metrics)
            if self.cfg.eval_every and self.step % self.cfg.eval_every == 0 and self.step < self.cfg.max_steps:
                metrics.update(_eval_metrics(self._evaluate()))
            self._write_metrics(metrics)
            if progress:
                progress.update(task_id, advance=1, description=(
                    f"RL acc {metrics['train/accuracy']:.2f} loss {metrics['loss/total']:+.3f}"))
            if self.step % self.cfg.checkpoint_every == 0:
                self._save()

    def _finish(self, t_start: float) -> dict[str, Any]:
        final = self._evaluate()
        self.summary.update({
            "eval_accuracy_after_rl": final["accuracy"],
            **({"eval_accuracy_after_rl_by_task": final["by_task"]} if final.get("by_task") else {}),
            "eval_mean_length_after_rl": final["mean_length"],
            **({"eval_ece_after_rl": final["ece"]} if "ece" in final else {}),
            "eval_n": len(self.eval_rows),
            "steps": self.step,
            "task": self.cfg.task,
            "wall_seconds": self._wall_prior + time.perf_counter() - t_start,
        })
        if self.world > 1:
            self.summary["num_processes"] = self.world
        cfg = self.cfg
        if (cfg.dynamic_sampling.enabled or cfg.pass_rate_filter.enabled or cfg.low_variance_filter.enabled
                or cfg.sample_budget is not None):
            self.summary["samples_generated"] = self._selection["samples_total"]
            if self._selection.get("pass_rate"):
                self.summary["pass_rate_filter"] = self._selection["pass_rate"]
        if self.step % self.cfg.checkpoint_every != 0 and self.step > 0:
            self._save()
        if self.is_main:
            self.summary.update(self._run_totals())
            self._write_metrics({"step": self.step, **_eval_metrics(final), "final": True})
            self.metrics_log.close()
            self.rollout_log.close()
            self._save_final(self.out / "final")
            plot_curves(self.out / "metrics.jsonl", self.out / "curves.png")
            (self.out / "summary.json").write_text(json.dumps(self.summary, indent=2))
            write_model_card(self.out)
        self.summary = dist.broadcast_object(self.summary)
        self.accelerator.wait_for_everyone()
        return self.summary

    def _save_final(self, final_dir: Path) -> None:
        """``final/``: the trained model (LoRA: merged into the base, or the adapter alone) + tokenizer."""
        policy = self._policy()
        bad = ckpt.nonfinite_parameters(policy)
        if bad:
            raise UserError(f"the policy weights hold NaN/inf after step {self.step} ({len(bad)} tensor(s), e.g. "
                            f"{bad[0]}); final/ was not written (the checkpoints hold the last finite weights)")
        if self.cfg.lora.enabled and self.cfg.lora.merge_final:
            from critique_rl.lora import merged_copy

            policy = merged_copy(policy)
        policy.save_pretrained(final_dir)
        self.tokenizer.save_pretrained(final_dir)


