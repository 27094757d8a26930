"""What every trainer run does around the training itself: seeding, determinism, quiet library output, precision
and the Accelerator, the learning-rate schedule, output checks, timers and the summary table."""


from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
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

from critique_rl.config import TrainConfig
from critique_rl.errors import ConfigError

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
    check_memory_bank(cfg)
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


def check_memory_bank(cfg: TrainConfig) -> None:
    """``memory.bank_path``, when memory is on and the file exists, must be an SQLite bank (one line naming the
    field, before anything in the run directory is written)."""
    memory = getattr(cfg, "memory", None)
    path = getattr(memory, "bank_path", None)
    if not getattr(memory, "enabled", False) or not path:
        return
    from critique_rl.memory.store import sqlite_file_problem

    problem = sqlite_file_problem(path)
    if problem is not None:
        raise ConfigError("memory.bank_path", str(path), f"'{path}' {problem}")


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
    out = {f"eval/{k}": result[k] for k in keys if k in result}
    out.update({f"eval/{name}/accuracy": acc for name, acc in result.get("by_task", {}).items()})
    return out


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
    by_before = summary.get("eval_accuracy_before_rl_by_task") or {}
    for name, acc in (summary.get("eval_accuracy_after_rl_by_task") or {}).items():  # several tasks
        start = by_before.get(name)
        t.add_row(f"  {name}: before -> after RL", (f"{start:.1%} -> " if start is not None else "") + f"{acc:.1%}")
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


def phase_lr(schedule: Callable[[int], float], phases: list[Any], learning_rate: float) -> Callable[[int], float]:
    """The run's LR schedule, scaled inside each rl phase by its ``learning_rate / learning_rate`` (the
    schedule itself runs over all RL steps). Unchanged when no phase sets a rate."""
    ends, factors, end = [], [], 0
    for ph in phases:
        if ph.kind == "rl":
            end += ph.steps or 0
            ends.append(end)
            factors.append(1.0 if ph.learning_rate is None else ph.learning_rate / learning_rate)
    if all(f == 1.0 for f in factors):
        return schedule

    def scaled(s: int) -> float:
        i = next((j for j, e in enumerate(ends) if s < e), len(ends) - 1)
        return schedule(s) * factors[i]

    return scaled
