"""A run's checkpointed training state beyond the weights: what :func:`save_run_state` writes (optimizer,
schedule, samplers, RNGs of every process, selection state, phases done, EMA teacher, critic counters, summary)
and what :func:`restore_run_state` puts back, returned as a typed :class:`RestoredState`; and which checkpoint a
run resumes from (:func:`resume_point`). The main process alone
writes; every process gathers its RNG states into the one checkpoint."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from critique_rl.errors import UserError
from critique_rl.train import checkpoint as ckpt
from critique_rl.train import distributed as dist
from critique_rl.train.ema import EmaTeacher
from critique_rl.train.run_setup import _critic_counts, _restore_critic_counts, console
from critique_rl.train.selection import SelectionState


@dataclass(frozen=True)
class RunHandles:
    """The live objects whose state a checkpoint holds (restored in place)."""

    optimizer: Any
    scheduler: Any
    sampler: Any
    phase_samplers: dict[str, Any]
    rng: random.Random
    critic: Any
    ema_teacher: EmaTeacher | None


@dataclass(frozen=True)
class RestoredState:
    """The values a resumed run continues from."""

    step: int
    summary: dict[str, Any]
    selection: SelectionState
    phases_done: int
    wall_prior: float
    critic_errors_seen: float


def save_run_state(folder: Path, step: int, handles: RunHandles, *, policy: torch.nn.Module, tokenizer: Any,
                   summary: dict[str, Any], selection: SelectionState, phases_done: int, world: int, is_main: bool,
                   keep: int, extra_files: dict[str, Any] | None) -> None:
    """Checkpoint ``step`` under ``folder``, written by the main process alone (every process's RNG state
    gathered into it). Every process must call it."""
    rng_states = dist.gather_objects(ckpt.rng_state())
    refine_states = dist.gather_objects(handles.rng.getstate())
    critic_states = dist.gather_objects(_critic_counts(handles.critic))
    if is_main:
        state = {"optimizer": handles.optimizer.state_dict(), "scheduler": handles.scheduler.state_dict(),
                 "sampler": handles.sampler.state_dict(), "summary": summary, "refine_rng": refine_states,
                 "rng_per_rank": rng_states, "world_size": world, "critic_stats": critic_states,
                 "selection": selection.to_dict(), "phases_done": phases_done,
                 "phase_samplers": {k: v.state_dict() for k, v in handles.phase_samplers.items()}}
        if handles.ema_teacher is not None:
            state["distill_teacher_ema"] = handles.ema_teacher.state_dict()
        ckpt.save_checkpoint(folder, step, policy, tokenizer, state, keep=keep, extra_files=extra_files)


def restore_run_state(path: Path, handles: RunHandles, *, world: int, rank: int, phases: list[Any]) -> RestoredState:
    """Load checkpoint ``path`` into ``handles`` (optimizer, schedule, samplers, EMA teacher, RNGs, critic
    counters) and return the values the run continues from. A checkpoint of another process count is refused."""
    state = ckpt.load_trainer_state(path)
    saved_world = state.get("world_size", 1)
    if saved_world != world:
        raise UserError(f"checkpoint {path} was written by {saved_world} process(es); resume it with the same "
                        f"number of processes (now {world})")
    handles.optimizer.load_state_dict(state["optimizer"])
    handles.scheduler.load_state_dict(state["scheduler"])
    handles.sampler.load_state_dict(state["sampler"])
    leading_sft = next((i for i, ph in enumerate(phases) if ph.kind != "sft"), len(phases))
    for key, sampler_state in state.get("phase_samplers", {}).items():
        if key in handles.phase_samplers:
            handles.phase_samplers[key].load_state_dict(sampler_state)
    if handles.ema_teacher is not None:
        if "distill_teacher_ema" not in state:
            raise UserError(f"checkpoint {path} holds no EMA teacher (it was written with distill_teacher: "
                            "current); resume with the same distill_teacher")
        handles.ema_teacher.load_state_dict(state["distill_teacher_ema"])
    summary = state["summary"]
    refine = state["refine_rng"]
    handles.rng.setstate(refine[rank] if isinstance(refine, list) else refine)
    _restore_critic_counts(handles.critic, (state.get("critic_stats") or [None] * world)[rank])
    ckpt.set_rng_state(state["rng_per_rank"][rank] if "rng_per_rank" in state else state["rng"])
    return RestoredState(step=state["step"], summary=summary, selection=SelectionState.from_dict(state.get("selection")),
                         phases_done=state.get("phases_done", leading_sft),  # older checkpoints: the warm-up was done
                         wall_prior=summary.get("wall_seconds_before_resume", 0.0),
                         critic_errors_seen=float(_critic_counts(handles.critic).get("errors", 0)))


def resume_point(out: Path, resume: bool, accelerator: Any) -> Path | None:
    """The checkpoint to resume from (or None); a fresh run's logs are cleared by the main process. A fresh run
    into a folder that holds checkpoints is refused."""
    is_main = accelerator.is_main_process
    warn = (lambda msg: console.print(f"[bold yellow]warning: {msg}[/]", soft_wrap=True, markup=True)) \
        if is_main else None
    resume_from = ckpt.resume_checkpoint(out / "checkpoints", warn=warn) if resume else None
    if not resume and ckpt.latest_checkpoint(out / "checkpoints") is not None:
        raise UserError(f"output_dir '{out}' already holds checkpoints of an earlier run; pass --resume to "
                        "continue it, or choose another --output-dir (or delete the folder)")
    accelerator.wait_for_everyone()  # every rank has looked before the main process changes anything
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        if resume_from is None:  # a fresh run owns its logs
            for name in ("metrics.jsonl", "rollouts.jsonl"):
                (out / name).unlink(missing_ok=True)
    return resume_from
