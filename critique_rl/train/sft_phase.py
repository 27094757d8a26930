"""One SFT phase of a run's schedule (the warm-up before RL, or a later ``kind: sft`` phase): its pairs, its
seed, its progress bar and the summary entries it leaves."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from rich.progress import Progress

from critique_rl.train.phase_state import phase_name
from critique_rl.train.sft import sft_warmup

PairsFn = Callable[[Any, int, bool], tuple[list[tuple[str, str]], int]]
"""``pairs(phase, steps, first) -> (pairs, steps)``: the phase's (prompt, completion) pairs and the steps to run."""


def run_sft_phase(cfg: Any, phases: list[Any], index: int, model: torch.nn.Module, tokenizer: Any, pairs: PairsFn,
                  progress: Progress | None, step: int, summary: dict[str, Any]) -> dict[str, Any]:
    """SFT phase ``index`` on ``model`` (trained in place). Seeded: the first phase by the run seed (the warm-up
    of earlier releases), later ones by seed + 1000 x index, so a rerun repeats it. Returns the summary entries
    to update (``sft_final_loss``, ``sft_seconds``, and with ``phases`` the phase's record appended to
    ``summary``'s list); nothing when the phase has no steps."""
    ph = phases[index]
    steps = ph.steps or 0
    if steps <= 0:
        return {}
    first = index == 0
    lr = ph.learning_rate if ph.learning_rate is not None else cfg.sft_learning_rate
    seed = cfg.seed if first else cfg.seed + 1000 * index
    label = "SFT warm-up" if first else f"SFT {phase_name(phases, index)}"
    task_id = progress.add_task(label, total=steps) if progress else None
    t0 = time.perf_counter()
    data, steps = pairs(ph, steps, first)
    if progress:
        progress.update(task_id, total=steps)
    losses = sft_warmup(
        model, tokenizer, data,
        steps=steps, batch_size=cfg.sft_batch_size, lr=lr, seed=seed,
        on_step=(lambda s, loss: progress.update(task_id, advance=1, description=f"SFT loss {loss:.3f}"))
        if progress else None,
    )
    out: dict[str, Any] = {"sft_final_loss": losses[-1],
                           "sft_seconds": summary.get("sft_seconds", 0.0) * (not first) + time.perf_counter() - t0}
    if cfg.phases:
        out["phases"] = [*summary.get("phases", []),
                         {"phase": index, "name": phase_name(phases, index), "kind": "sft", "steps": steps,
                          "at_rl_step": step, "final_loss": losses[-1]}]
    return out
