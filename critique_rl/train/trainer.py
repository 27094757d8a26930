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
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, ProjectConfiguration
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
from critique_rl.data import load_rows, validate_rows
from critique_rl.errors import ConfigError, UserError
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
from critique_rl.train import selection
from critique_rl.train.batching import enable_fused_head, fused_head_supported, pack
from critique_rl.train.critique_step import (
    choose_refinements,
    critique_requests,
    refine_text,
    refinement_demos,
    select_for_critique,
)
from critique_rl.train.ema import EmaTeacher
from critique_rl.train.evaluate import EVAL_SEED, greedy_records, summarise_records
from critique_rl.train.metrics import JsonlWriter, plot_curves, read_jsonl
from critique_rl.train.rollout_batch import AdvantagePlan, CritiqueResult, RolloutBatch
from critique_rl.train.sampler import PromptSampler
from critique_rl.train.sft import sft_warmup
from critique_rl.train.trackers import flat_config, resolve_trackers, scalars, tracker_init_kwargs
from critique_rl.train.update import NonFiniteGuard, Normalisation, UpdateBatch, policy_update, score_tokens

__all__ = ["EVAL_SEED", "CritiqueGRPOTrainer", "resolve_mixed_precision", "summary_table"]

console = Console(stderr=True)
LORA_BASE_DIR = "lora_base"
"""Run-directory folder holding the frozen base weights of a LoRA run (what the adapter is trained on)."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def deterministic_mode(enabled: bool) -> Iterator[None]:
    """``TrainConfig.deterministic``: make torch pick deterministic kernels
    (``torch.use_deterministic_algorithms(True)``, cuDNN without autotuning) and give cuBLAS the fixed
    workspace it needs for reproducible GEMMs (``CUBLAS_WORKSPACE_CONFIG=:4096:8``, set before the trainer
    initialises CUDA, unless already set). An op with no deterministic kernel then raises. The previous
    torch settings come back on exit (the environment variable stays: cuBLAS reads it once)."""
    if not enabled:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[2], before[3]


@contextmanager
def quiet_library_progress() -> Iterator[None]:
    """Silence transformers' / huggingface_hub's own tqdm bars ("Loading weights", "Writing model shards",
    one per checkpoint) while the trainer runs; ours is the only progress display. Restores the previous
    settings on exit."""
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    was_on, hub_was_off = hf_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
        if hub_was_off:
            hub_utils.disable_progress_bars()
        else:
            hub_utils.enable_progress_bars()


def resolve_mixed_precision(requested: str, device: str) -> str:
    """``auto`` -> ``bf16`` on a CUDA GPU that supports it, else ``no``; fp16/bf16 need a GPU (one-line error)."""
    on_gpu = device != "cpu" and torch.cuda.is_available()
    if requested == "auto":
        return "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "no"
    if requested == "fp16" and not on_gpu:
        raise ConfigError("mixed_precision", requested, "fp16 autocast needs a CUDA GPU; use auto or no on CPU")
    return requested


def start_run(cfg: TrainConfig, out: Path, **accelerator_kwargs: Any) -> Accelerator:
    """What every trainer does first: check the device and the output folder, seed everything, and build the
    Accelerator with the resolved mixed precision (CPU when no GPU is asked for or present)."""
    check_device(cfg.device)
    check_output_dir(out)
    seed_everything(cfg.seed)
    precision = resolve_mixed_precision(cfg.mixed_precision, cfg.device)
    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != precision:
        # a second trainer in this process with another precision (a notebook, a benchmark's arms): accelerate
        # keeps one global state; drop it (the process group, PartialState, is kept)
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=precision,
                       cpu=(cfg.device == "cpu") or (cfg.device == "auto" and not torch.cuda.is_available()),
                       **accelerator_kwargs)


def lr_schedule(cfg: TrainConfig) -> Callable[[int], float]:
    """The RL learning-rate multiplier at optimizer step ``s``: linear warm-up over ``warmup_steps``, then
    constant, linear decay to 0 or cosine decay to 0 at ``max_steps`` (``lr_scheduler``)."""
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

    return schedule


def check_device(device: str) -> None:
    """``device: cuda`` needs a visible CUDA GPU (one-line error instead of silently training on the CPU)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", device, "no CUDA GPU is visible to this process; use auto or cpu (or check "
                          "CUDA_VISIBLE_DEVICES and the torch build)")


def check_output_dir(out: Path) -> None:
    """``output_dir`` must be (or be creatable as) a writable folder: not a file, not below a file."""
    for path in [out, *out.parents]:
        if not path.exists():
            continue
        if not path.is_dir():
            where = "is a file" if path == out else f"is below '{path}', which is a file"
            raise ConfigError("output_dir", str(out), f"{where}; choose a folder path (--output-dir)")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError("output_dir", str(out), f"'{path}' is not writable; choose another --output-dir")
        return


CRITIC_MIN_REQUESTS = 16
"""Critic requests made before ``critic.max_failure_share`` is enforced."""


class _Timer:
    """Wall time per stage of a step (``time/<stage>``)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.times[f"time/{stage}"] = self.times.get(f"time/{stage}", 0.0) + time.perf_counter() - t

    def total(self) -> dict[str, float]:
        return {**self.times, "time/step": time.perf_counter() - self.t0}


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
        self.train_rows = self._rows(self._train_arg, cfg.train_file, "train", cfg.sft_examples)
        self.eval_rows = self._rows(self._eval_arg, cfg.eval_file, "eval", cfg.eval_n)[: cfg.eval_n]
        # task-specific SFT helpers (the task's mistake, its completion format) only on the task's own rows
        self._task_rows = self._train_arg is None and not cfg.train_file
        check_templates(cfg.critic.template_dir)
        self._nonfinite = NonFiniteGuard(cfg.max_nonfinite_steps)
        self._critic_errors_seen = 0.0
        warn = (lambda msg: console.print(f"[bold yellow]warning: {msg}[/]", soft_wrap=True, markup=True)) \
            if self.accelerator.is_main_process else None
        resume_from = ckpt.latest_valid_checkpoint(self.out / "checkpoints", warn=warn) if resume else None
        if resume and resume_from is None and self.is_main:
            console.print(f"[yellow]--resume: no checkpoint under {self.out / 'checkpoints'}; starting fresh[/]")
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
            f if callable(f) else build_reward_funcs([f], self.task, cfg.reward_kwargs)[0] for f in funcs
        ]
        self.reward_names = [func_name(f) for f in self.reward_funcs]
        self.gates = build_gates(cfg.gates, self.task, cfg.gate_kwargs)
        weights = cfg.reward_weights or [1.0] * len(self.reward_funcs)
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)

        self.sampler = PromptSampler(self.train_rows, cfg.seed)  # same state on every rank: global batches
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
        self._phase_rows: dict[str, list[dict[str, Any]]] = {}
        self._phase_samplers: dict[str, PromptSampler] = {}
        for i, ph in enumerate(self.phases):
            if ph.train_file and ph.train_file not in self._phase_rows:
                self._phase_rows[ph.train_file] = load_rows(ph.train_file, field=f"phases[{i}].train_file")
                self._phase_samplers[ph.train_file] = PromptSampler(self._phase_rows[ph.train_file], cfg.seed)
        self._run_rewards = (self.reward_funcs, self.reward_names, self.reward_weights)

    def _enter_phase(self, index: int) -> None:
        """Make phase ``index``'s data and objectives current (rl phases)."""
        ph = self.phases[index]
        self._phase_sampler = self._phase_samplers.get(ph.train_file) if ph.train_file else None
        if ph.reward_funcs is None and ph.reward_weights is None:
            self.reward_funcs, self.reward_names, self.reward_weights = self._run_rewards
            return
        funcs = (self._run_rewards[0] if ph.reward_funcs is None else
                 build_reward_funcs(list(ph.reward_funcs), self.task, self.cfg.reward_kwargs))
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
                pairs += [(self.prompt_text({"prompt": p}), c) for p, c in refinement_demos(
                    self._sft_task(), self.train_rows, cfg.sft_refine_fraction, cfg.seed, self._sft_completion,
                    cfg.critic.template_dir)]
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
        if given is not None:
            rows = validate_rows(list(given), f"{split}_dataset")
            if not rows:
                raise UserError(f"{split}_dataset is empty; pass rows with 'prompt' and 'answer'")
            return rows
        if path:
            return load_rows(path, field=f"{split}_file")
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
        text = row["prompt"] if not context else f"{context}\n{row['prompt']}"
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
        return self.task if self._task_rows else dataclasses.replace(self.task, mistake=None)

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
        records = [r for part in dist.gather_objects(records) for r in part]
        return summarise_records(records, conf is not None)

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
    def _next_prompts(self) -> tuple[list[dict[str, Any]], list[str] | None]:
        """This process's shard of the global prompt batch, and the memory context of each (or None)."""
        rows = (self._phase_sampler or self.sampler).next_batch(self.cfg.prompts_per_step)
        contexts = None
        if self.memory_on:
            contexts = dist.broadcast_object(self.memory_hook.contexts(rows) if self.is_main else None)
            contexts = dist.shard(contexts, self.rank, self.world)
        return dist.shard(rows, self.rank, self.world), contexts

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

    def _critique_and_refine(self, batch: RolloutBatch) -> CritiqueResult | None:
        """Critique the selected responses, sample one refinement each, score them (Critique-GRPO)."""
        cfg = self.cfg
        n = batch.group_size
        mode = "all" if cfg.distill_on == "all" and cfg.distill_weight > 0 else cfg.critique_on
        idx = select_for_critique(batch.correct, n, mode)
        if not idx:
            return None
        if cfg.refinement_source == "reference":
            return self._reference_samples(batch, idx)
        texts = batch.texts
        critiques = self.critic.critique(critique_requests(self.task, batch.rows, texts, batch.correct, idx))
        teacher_prompts = [
            self.prompt_text({"prompt": refine_text(batch.rows[i]["prompt"], texts[i], c.text, cfg.critic.template_dir)})
            for i, c in zip(idx, critiques, strict=True)
        ]
        refine_idx = idx if mode == cfg.critique_on else select_for_critique(batch.correct, n, cfg.critique_on)
        pos = {i: j for j, i in enumerate(idx)}
        ref_src = [i for i in refine_idx if i in pos]
        params = SamplingParams(n=1, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=self.max_new_tokens)
        outs = self.generator.generate([teacher_prompts[pos[i]] for i in ref_src], params) if ref_src else []
        ref_completions = [o[0] for o in outs]
        ref_rows = [batch.rows[i] for i in ref_src]
        if ref_src:
            R_ref, passed_ref, _ = self._score(ref_rows, ref_completions)
        else:
            R_ref, passed_ref = torch.zeros(0, len(self.reward_funcs)), torch.zeros(0, dtype=torch.bool)
        ref_correct = self._correct(ref_rows, ref_completions)
        return CritiqueResult(idx=idx, critiques=critiques, teacher_prompts=teacher_prompts, ref_src=ref_src,
                              ref_completions=ref_completions, ref_rewards=R_ref, ref_passed=passed_ref,
                              ref_correct=ref_correct)

    def _reference_samples(self, batch: RolloutBatch, idx: list[int]) -> CritiqueResult:
        """Control arm (``refinement_source: reference``): each selected row's reference completion (the task's
        demonstration format, the ``answer`` on user rows) stands in for a refinement; no critique is written."""
        eos = self.tokenizer.eos_token_id
        ref_rows = [batch.rows[i] for i in idx]
        texts = [self._sft_completion(row) for row in ref_rows]
        ids = [(self._encode(t) + ([eos] if eos is not None else []))[: self.max_new_tokens] for t in texts]
        ref_completions = [Completion(token_ids=i, logprobs=[], text=t, finished=bool(i) and i[-1] == eos)
                           for i, t in zip(ids, texts, strict=True)]
        R_ref, passed_ref, _ = self._score(ref_rows, ref_completions)
        return CritiqueResult(idx=[], critiques=[], teacher_prompts=[], ref_src=list(idx),
                              ref_completions=ref_completions, ref_rewards=R_ref, ref_passed=passed_ref,
                              ref_correct=self._correct(ref_rows, ref_completions))

    def _refinement_slots(self, crit: CritiqueResult | None) -> int:
        """k: refinement slots per group. With several processes it is constant whenever a critic is on (the
        groups of every process stack into one tensor); with one, a step with no critique has none."""
        if not self._refines or (crit is None and self.world == 1):
            return 0
        return self.cfg.refinements_per_group

    def _mixed_group(self, batch: RolloutBatch, crit: CritiqueResult | None):
        """Rewards ``[G, n+k, K]`` and pass mask ``[G, n+k]`` of initial samples plus kept refinements (empty
        slots: NaN and masked), and the refinements kept as ``(group, slot, j)``."""
        n, K, G = batch.group_size, batch.rewards.shape[-1], batch.num_groups
        k = self._refinement_slots(crit)
        R_mix = torch.full((G, n + k, K), float("nan"))
        R_mix[:, :n] = batch.rewards.view(G, n, K)
        passed_mix = torch.zeros(G, n + k, dtype=torch.bool)
        passed_mix[:, :n] = batch.passed.view(G, n)
        kept: list[tuple[int, int, int]] = []
        if k and crit is not None:
            group_of = [i // n for i in crit.ref_src]
            chosen = choose_refinements(group_of, crit.ref_correct, k, G, self.rng)
            for g, js in enumerate(chosen):
                for slot, j in enumerate(js):
                    R_mix[g, n + slot] = crit.ref_rewards[j]
                    passed_mix[g, n + slot] = bool(crit.ref_passed[j])
                    kept.append((g, n + slot, j))
        return R_mix, passed_mix, kept

    def _advantages(self, batch: RolloutBatch, crit: CritiqueResult | None) -> AdvantagePlan:
        """Advantages over the mixed groups. Groups are whole inside a process; the aggregator runs on the
        groups of all processes (so batch statistics such as GDPO's whitening are global) and each process
        keeps its own rows. Gated-out samples, empty slots and dropped groups get mask False."""
        cfg = self.cfg
        R_mix, passed_mix, kept = self._mixed_group(batch, crit)
        G = R_mix.shape[0]
        R_all, passed_all = dist.gather_tensor(R_mix), dist.gather_tensor(passed_mix)
        mask, groups_kept = apply_gates(torch.ones_like(passed_all), passed_all)
        lv = cfg.low_variance_filter
        lv_drop = None
        if lv.enabled:  # DRO: on the gathered initial samples, so every rank drops the same groups
            n = batch.group_size
            std = selection.group_reward_std(R_all[:, :n].reshape(-1, R_all.shape[-1]), self.reward_weights, n)
            lv_drop = selection.low_variance_drop(std, lv.min_std, lv.drop_fraction)
            mask = mask & ~lv_drop.unsqueeze(-1)
        adv, diag = aggregate_rewards(
            cfg.reward_aggregator, R_all, self.reward_weights, mask,
            estimator=cfg.advantage_estimator, w_lambda=cfg.w_lambda, reward_threshold=cfg.reward_threshold,
        )
        diag["groups_kept"] = groups_kept.float().mean().item()
        if lv_drop is not None:
            diag["low_variance_dropped"] = int(lv_drop.sum())
        mine = slice(self.rank * G, (self.rank + 1) * G)
        return AdvantagePlan(advantages=adv[mine], mask=mask[mine], kept=kept, diagnostics=diag)

    def _update_batch(self, batch: RolloutBatch, crit: CritiqueResult | None, plan: AdvantagePlan) -> tuple[UpdateBatch, dict]:
        """Loss rows: the initial samples, then kept refinements, all under the plain (sampling) prompt; per-token
        advantages ``w_eval * A_group (+ w_dir * A_distill)``; reference log-probs when the KL term is on."""
        cfg = self.cfg
        n = batch.group_size
        encoded = {p: self._encode(p) for p in set(batch.prompts)}  # n samples share one prompt
        prompt_ids = [encoded[p] for p in batch.prompts]
        comp_ids = [c.token_ids for c in batch.completions]
        row_adv = plan.advantages[:, :n].reshape(-1).tolist()
        row_mask = plan.mask[:, :n].reshape(-1).tolist()
        offpolicy = [False] * len(comp_ids)
        for g, slot, j in plan.kept:
            prompt_ids.append(prompt_ids[g * n])
            comp_ids.append(crit.ref_completions[j].token_ids)
            row_adv.append(plan.advantages[g, slot].item())
            row_mask.append(bool(plan.mask[g, slot]))
            offpolicy.append(True)
        tokens = pack(prompt_ids, comp_ids, self.tokenizer.pad_token_id)
        tokens.completion_mask *= torch.tensor(row_mask, dtype=tokens.completion_mask.dtype).unsqueeze(-1)
        adv_tok = cfg.eval_weight * torch.tensor(row_adv).unsqueeze(-1).expand(-1, tokens.completion_len).clone()
        ub = UpdateBatch(tokens=tokens, advantages=adv_tok, offpolicy=torch.tensor(offpolicy))
        if all(len(c.logprobs) == len(c.token_ids) for c in batch.completions):  # engine log-probs: TIS, mismatch
            ub.sampling_logp = torch.zeros(len(comp_ids), tokens.completion_len)
            for i, c in enumerate(batch.completions):
                ub.sampling_logp[i, : len(c.logprobs)] = torch.tensor(c.logprobs, dtype=torch.float32)
            # refinement rows: log-probs under the critique they were sampled with (offpolicy_weighting); an
            # injected reference answer has none and keeps 0 (a deterministic source)
            for row, (_g, _slot, j) in enumerate(plan.kept, start=len(batch.completions)):
                lp = crit.ref_completions[j].logprobs
                if lp:
                    ub.sampling_logp[row, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
        distill_metrics = self._directive_distillation(ub, crit, batch) if crit and cfg.distill_weight > 0 else {}
        if cfg.kl_beta > 0:
            ub.ref_logp = self._reference_logprobs(ub)
        return ub, distill_metrics

    def _reference_logprobs(self, ub: UpdateBatch) -> torch.Tensor:
        """log pi_ref of the loss tokens: the frozen copy, or (LoRA) the same model with the adapter disabled."""
        cfg = self.cfg
        tokens = ub.tokens.to(self.accelerator.device)
        if self.ref_model is not None:
            return score_tokens(self.ref_model, tokens, cfg.temperature, cfg.mini_batch_size, self.accelerator.autocast)[0]
        from critique_rl.lora import adapter_disabled

        policy = self._policy()
        with adapter_disabled(policy):
            return score_tokens(policy, tokens, cfg.temperature, cfg.mini_batch_size, self.accelerator.autocast)[0]

    def _directive_distillation(self, ub: UpdateBatch, crit: CritiqueResult, batch: RolloutBatch) -> dict:
        """Teacher = the policy on the critique-conditioned prompt; student = the policy on q; both scored on
        the student's own tokens. Adds w_dir * A_distill to the per-token advantages (sampled_token) or the
        teacher's top-K for the reverse-KL term (topk_logits)."""
        cfg = self.cfg
        idx = crit.idx
        T = ub.tokens.completion_len
        comp = [batch.completions[i].token_ids for i in idx]
        teacher = pack([self._encode(p) for p in crit.teacher_prompts], comp, self.tokenizer.pad_token_id)
        student = ub.tokens.select(torch.tensor(idx))
        model, dev, ac = self._policy(), self.accelerator.device, self.accelerator.autocast
        topk = cfg.distill_topk if cfg.distill_mode == "topk_logits" else None
        teacher_model = self._ema_teacher.model if self._ema_teacher is not None else model
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

    def _normalisation(self, ub: UpdateBatch) -> Normalisation:
        """Global loss-aggregation counts over the processes (see :class:`Normalisation`)."""
        n = ub.tokens.input_ids.shape[0]
        seqs, toks = dist.all_reduce_sum([float(n), float(ub.tokens.completion_mask.sum().clamp_min(1))])
        micro = dist.all_reduce_max(-(-n // self.cfg.mini_batch_size))
        return Normalisation(seqs / self.world, toks / self.world, micro)

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
        self._selection["samples_total"] += fill.samples
        out: dict[str, Any] = {"train/zero_spread_groups": fill.first_zero_spread,
                               "selection/samples": fill.samples,
                               "selection/samples_total": self._selection["samples_total"]}
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
        applied = total - len(hard | easy) >= self.cfg.prompts_per_step
        if applied:
            self.sampler.exclude(hard | easy)
        elif self.is_main:
            console.print(f"[bold yellow]warning: pass_rate_filter would leave {total - len(hard | easy)} of {total} "
                          f"prompts ({len(hard)} too hard, {len(easy)} too easy), fewer than one batch "
                          f"({self.cfg.prompts_per_step}); the pool is left as it was[/]", soft_wrap=True)
        self._selection["samples_total"] += len(measured) * pf.samples
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
        self._selection["pass_rate"] = info
        return info

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
                     "selection": self._selection, "phases_done": self._phases_done,
                     "phase_samplers": {k: v.state_dict() for k, v in self._phase_samplers.items()}}
            if self._ema_teacher is not None:
                state["distill_teacher_ema"] = self._ema_teacher.state_dict()
            extra = {"memory.sqlite": self.memory_hook.snapshot} if self.memory_hook is not None else None
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
        self._selection = state.get("selection", self._selection)
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
                self._write_metrics({"step": 0, **self._eval_row0})
            if resume_from is not None:
                self._restore(resume_from)
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


def _critic_counts(critic: Any) -> dict[str, int]:
    """The critic's cumulative counters (empty for a critic without :class:`CriticStats`)."""
    stats = getattr(critic, "stats", None)
    counts = getattr(stats, "counts", None)
    return dict(counts) if isinstance(counts, dict) else {}


def _restore_critic_counts(critic: Any, counts: dict[str, int] | None) -> None:
    """Put a checkpoint's critic counters back, so ``critic/*`` metrics continue instead of restarting at 0."""
    stats = getattr(critic, "stats", None)
    if not counts or not isinstance(getattr(stats, "counts", None), dict):
        return
    for name, value in counts.items():
        if name in stats.counts:
            stats.add(name, int(value) - int(stats.counts[name]))


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
