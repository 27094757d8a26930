"""The data-selection measurements between steps: the pass-rate filter's difficulty measurement (prompts too hard
or too easy leave the pool) and the task order's entropy measurement. Functions of a :class:`StepContext` and
the typed :class:`SelectionState`; each returns its metrics and a new state. The pure decisions live in
:mod:`critique_rl.train.selection` and :mod:`critique_rl.train.task_mix`."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from critique_rl.rollout.base import SamplingParams
from critique_rl.train import distributed as dist
from critique_rl.train import selection, task_mix
from critique_rl.train.run_setup import cfg_bs, console
from critique_rl.train.selection import SelectionState
from critique_rl.train.step_context import StepContext


def measure_pass_rates(ctx: StepContext, train_rows: list[dict[str, Any]], state: SelectionState,
                       out: Path) -> tuple[dict[str, Any], SelectionState]:
    """``pass_rate_filter``: sample each measured prompt ``samples`` times, drop those too hard / too easy from
    the pool (``ctx.draw.pool``). Processes measure disjoint shares of the prompts; the rates are gathered, so
    every rank takes the same decision. Returns ``selection/pass_rate_*`` metrics and the new state; the main
    process writes what was removed under ``out/selection``."""
    cfg, pool = ctx.cfg, ctx.draw.pool
    pf = cfg.pass_rate_filter
    t0 = time.perf_counter()
    measured = selection.measured_indices(len(train_rows), pf.max_prompts, cfg.seed)
    mine = measured[ctx.rank :: ctx.world]
    params = SamplingParams(n=pf.samples, temperature=cfg.temperature, top_p=cfg.top_p,
                            max_new_tokens=ctx.fmt.max_new_tokens)
    rates: dict[int, float] = {}
    chunk = max(1, cfg_bs(cfg) // pf.samples)
    for s in range(0, len(mine), chunk):
        idx = mine[s : s + chunk]
        rows = [train_rows[i] for i in idx]
        groups = ctx.engine.generate([ctx.fmt.text(r) for r in rows], params)
        flat_rows = [r for r in rows for _ in range(pf.samples)]
        ok = ctx.scorer.correct(flat_rows, [c for g in groups for c in g], ctx.step)
        for j, i in enumerate(idx):
            rates[i] = sum(ok[j * pf.samples : (j + 1) * pf.samples]) / pf.samples
    rates = {i: r for part in dist.gather_objects(rates) for i, r in part.items()}
    hard, easy = selection.pass_rate_exclusions(rates, pf.too_hard_at_most, pf.too_easy_at_least)
    total = len(train_rows)
    applied = pool.can_exclude(hard | easy, cfg.prompts_per_step)
    if applied:
        pool.exclude(hard | easy)
    elif ctx.is_main:
        console.print(f"[bold yellow]warning: pass_rate_filter would leave {total - len(hard | easy)} of {total} "
                      f"prompts ({len(hard)} too hard, {len(easy)} too easy), fewer than one batch "
                      f"({cfg.prompts_per_step}); the pool is left as it was[/]", soft_wrap=True)
    if ctx.is_main:  # what the filter removed, prompt by prompt (rewritten if a resumed run measures again)
        folder = out / "selection"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"pass_rates_step{ctx.step:06d}.jsonl", "w") as fh:
            for i in sorted(rates):
                reason = "too_hard" if i in hard else "too_easy" if i in easy else None
                fh.write(json.dumps({"index": i, "prompt": train_rows[i]["prompt"],
                                     "pass_rate": rates[i], "dropped": reason if applied else None}) + "\n")
    info = {"selection/pass_rate_measured": len(rates), "selection/pass_rate_mean": sum(rates.values()) / max(1, len(rates)),
            "selection/pass_rate_too_hard": len(hard), "selection/pass_rate_too_easy": len(easy),
            "selection/pass_rate_applied": int(applied), "selection/pool_size": total - len(pool.excluded),
            "selection/pass_rate_samples": len(measured) * pf.samples,
            "time/pass_rate": time.perf_counter() - t0}
    new = dataclasses.replace(state, samples_total=state.samples_total + len(measured) * pf.samples, pass_rate=info)
    return info, new


def order_tasks(ctx: StepContext, train_rows: list[dict[str, Any]],
                state: SelectionState) -> tuple[dict[str, Any], SelectionState]:
    """``task_order`` entropy / listed: the order of the tasks (kept in the checkpoint). ``entropy`` samples
    ``task_order_prompts`` prompts per task ``num_generations`` times on the policy as RL starts; processes
    measure disjoint shares and sum their token counts, so all agree. Returns ``order/*`` metrics and the new
    state (``task_order``, ``task_entropy``)."""
    cfg = ctx.cfg
    info: dict[str, Any] = {}
    order = list(cfg.tasks)
    entropy = state.task_entropy
    if cfg.task_order == "entropy":
        t0 = time.perf_counter()
        params = SamplingParams(n=cfg.num_generations, temperature=cfg.temperature, top_p=cfg.top_p,
                                max_new_tokens=ctx.fmt.max_new_tokens)
        sums: dict[str, list[float]] = {}
        per_call = max(1, cfg_bs(cfg) // cfg.num_generations)  # prompts per generate call
        for name in order:
            idx = ctx.draw.pool.index[name]
            chosen = [idx[i] for i in selection.measured_indices(len(idx), cfg.task_order_prompts, cfg.seed)]
            mine = [train_rows[i] for i in chosen[ctx.rank :: ctx.world]]
            nll, toks = 0.0, 0
            for s in range(0, len(mine), per_call):
                chunk = mine[s : s + per_call]
                for group in ctx.engine.generate([ctx.fmt.text(r) for r in chunk], params):
                    for c in group:
                        nll -= sum(c.logprobs)
                        toks += len(c.logprobs)
            sums[name] = [nll, float(toks)]
        parts = dist.gather_objects(sums)
        entropy = {n: task_mix.token_entropy(sum(p[n][0] for p in parts), int(sum(p[n][1] for p in parts)))
                   for n in order}
        order = task_mix.entropy_order(entropy)
        info.update({f"order/entropy/{n}": h for n, h in entropy.items()})
        info["time/task_order"] = time.perf_counter() - t0
    return info, dataclasses.replace(state, task_order=order, task_entropy=entropy)


def task_order_summary(state: SelectionState, blocks: list[tuple[str, int, int]], is_main: bool) -> dict[str, Any]:
    """The run summary's ``task_order`` (and ``task_entropy``) entries; the main process prints the order."""
    out: dict[str, Any] = {"task_order": [{"task": n, "first_step": a + 1, "last_step": b} for n, a, b in blocks]}
    if state.task_entropy is not None:
        out["task_entropy"] = state.task_entropy
    if is_main:
        console.print("task order: " + ", ".join(f"{n} (steps {a + 1}-{b})" for n, a, b in blocks))
    return out
