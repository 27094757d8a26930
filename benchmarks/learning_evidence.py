"""Fair arms x seeds experiments: every arm of a seed starts from the same SFT checkpoint.

    python benchmarks/learning_evidence.py --task addition_carry --seeds 0 1 2 \
        --arms grpo grpo+reference critique critique_unshaped --max-steps 200 --jobs 2 \
        --set sft_mistake_rate=0.9 --out benchmarks/results/learning_evidence/plateau

One SFT warm-up per seed (``sft_s<seed>/final``), then one process per (arm, seed) started from it with
``sft_steps: 0``, up to ``--jobs`` at a time. Each finished run leaves ``<arm>_s<seed>/result.json``; re-running
the same command skips finished runs and restarts unfinished ones (resume). Writes ``results.json``,
``results.md`` (mean +- std over seeds and the paired difference to the baseline arm, per seed) and
``curves.png`` (held-out greedy accuracy over RL steps, mean over seeds). All arms go through the same
``CritiqueGRPOTrainer`` code path users run; an arm is only a set of config overrides (ARMS).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import yaml

COT_SELF = {"backend": "hf", "model": "policy", "kind": "cot", "max_tokens": 48, "max_regenerations": 1,
            "fallback_kind": "indicative"}
"""The policy as its own critic; a critique it cannot write (no verdict, or one the verifier contradicts after a
retry) falls back to a verdict only, never to the reference answer (that would be `critique` again)."""
TOPK_EMA = {"distill_weight": 0.2, "distill_mode": "topk_logits", "distill_teacher": "ema"}
"""Directive distillation as a top-K + tail divergence (reverse KL by default) to an EMA teacher (SDPO)."""
FKL_EMA = {**TOPK_EMA, "distill_divergence": "forward_kl"}
"""The same with forward KL(teacher || student): its pull towards the teacher's token does not vanish when the
student gives that token ~0 probability (GKD arXiv:2306.13649)."""
UNSHAPED = {"offpolicy_gamma": None}
WRONG = {"critique_on": "wrong"}
INDICATIVE = {"backend": "rule", "kind": "indicative"}
# Arms: config overrides on top of the shared base. Controls first, then Critique-GRPO variants.
ARMS: dict[str, dict[str, Any]] = {
    # plain GRPO: no critiques, nothing added to the groups
    "grpo": {"critique_on": "none"},
    # control: the reference answer injected as the off-policy sample of all-wrong groups, no critique
    "grpo+reference": {"refinement_source": "reference"},
    "grpo+reference_unshaped": {"refinement_source": "reference", **UNSHAPED},
    # Critique-GRPO (arXiv:2506.03106): rule ground-truth critiques, one refinement per all-wrong group,
    # refinement tokens shaped p/(p+0.1) (LUFFY)
    "critique": {},
    "critique_unshaped": UNSHAPED,  # plain -A log p on refinement tokens
    "critique_gamma1": {"offpolicy_gamma": 1.0},
    "critique_unshaped_k4": {**UNSHAPED, "refinements_per_group": 4},  # 4 refinements per group
    "critique_unshaped_gap": {**UNSHAPED, "offpolicy_weighting": "gap"},  # directive tokens weigh more
    "critique_k2": {"refinements_per_group": 2},
    "critique_k4": {"refinements_per_group": 4},
    "critique_indicative": {"critic": INDICATIVE},  # verdict only
    "critique_cot_self": {"critic": COT_SELF},
    "critique+distill": {"distill_weight": 0.2},
    "critique+distill_topk": {"distill_weight": 0.2, "distill_mode": "topk_logits"},
    "critique+distill_topk_ema": TOPK_EMA,
    "critique+distill_topk_ema_w1": {**TOPK_EMA, "distill_weight": 1.0},
    "critique+distill_fkl_ema": FKL_EMA,
    "critique_unshaped+distill_fkl_ema": {**UNSHAPED, **FKL_EMA},
    # the critique-content controls with the forward-KL recipe: a verdict only / the policy critiquing itself
    "critique_indicative+distill_fkl_ema": {"critic": INDICATIVE, **FKL_EMA},
    "critique_cot_self+distill_fkl_ema": {"critic": COT_SELF, **FKL_EMA},
    # every group with a wrong answer gets a critiqued refinement (the paper critiques every response), not only
    # the all-wrong groups: at a mid-range start those are ~1.6 of 16 groups a step and the channel is ~1% of the
    # update; the control injects the reference answer into the same groups
    "critique_wrong": WRONG,
    "critique_wrong_unshaped": {**WRONG, **UNSHAPED},
    "critique_wrong_unshaped_k2": {**WRONG, **UNSHAPED, "refinements_per_group": 2},  # two refinements per group
    "critique_wrong_unshaped+distill_fkl_ema": {**WRONG, **UNSHAPED, **FKL_EMA},
    "grpo+reference_wrong_unshaped": {**WRONG, "refinement_source": "reference", **UNSHAPED},
    # the same groups with a verdict-only critique: the policy retries knowing only that it was wrong
    "critique_wrong_unshaped_indicative": {**WRONG, **UNSHAPED, "critic": INDICATIVE},
    # task order on a two-task mix (issue #14; run with --task addition+reverse --set
    # 'tasks={addition: 1, reverse: 1}'): GRPO, all tasks in every batch vs one task after another
    "order_joint": {"critique_on": "none", "task_order": "joint"},
    "order_entropy": {"critique_on": "none", "task_order": "entropy"},  # lowest output entropy first
    "order_addition_first": {"critique_on": "none", "task_order": "listed", "tasks": {"addition": 1, "reverse": 1}},
    "order_reverse_first": {"critique_on": "none", "task_order": "listed", "tasks": {"reverse": 1, "addition": 1}},
    # deciding apart from learning (issue #14; --task addition_conf): a proper scoring rule, the threshold fitted
    # afterwards (benchmarks/decide_vs_learn.py) vs the user's asymmetric utility (+1 / -2 / 0) as the reward
    "decide_brier": {"critique_on": "none", "reward_funcs": ["correctness", "brier"]},
    "decide_utility": {"critique_on": "none", "reward_funcs": ["selective_utility"],
                       "reward_kwargs": {"selective_utility": {"reward_right": 1.0, "penalty_wrong": 2.0,
                                                              "abstain_value": 0.0}}},
}


def _config_has(field_name: str) -> bool:
    from critique_rl.config import TrainConfig

    return field_name in TrainConfig.__dataclass_fields__


if _config_has("offpolicy_baseline"):  # issue 29 item 7: the trainer hook (f2exp worktree until the lead applies it)
    # the group baseline over the on-policy samples only (critique_rl/algos/offpolicy_baseline.py)
    ARMS["critique_wrong_unshaped_onpolicy_baseline"] = {**WRONG, **UNSHAPED, "offpolicy_baseline": "onpolicy"}
REPLACED = ("tasks",)
"""Arm keys that replace the base value instead of merging into it (the order of `tasks` is the order trained)."""
METRICS = ("task/addition/accuracy", "task/reverse/accuracy", "critique/refine_success_rate", "critique/fallbacks",
           "critique/groups_rescued", "critique/all_wrong_groups", "offpolicy/grad_weight_share", "offpolicy/logp_mean",
           "train/accuracy", "time/step", "entropy")


def base_config(task: str, seed: int, out: Path, max_steps: int, eval_every: int, eval_n: int,
                extra: dict[str, Any]) -> dict[str, Any]:
    """The demo's settings (SFT mixture with refinement demos, cosine LR, rule critic on all-wrong groups), memory
    off (it has its own benchmark), then ``--set`` overrides; identical for the warm-up and every arm."""
    from critique_rl.config import DEMO_PRESET, PRESETS

    kw = {k: v for k, v in DEMO_PRESET.items() if k != "memory"}
    kw.update(PRESETS["paper"])  # the arms below were defined (and measured) on the published form's defaults
    kw.update(task=task, seed=seed, output_dir=str(out), max_steps=max_steps, eval_every=eval_every,
              eval_n=eval_n, eval_batch_size=eval_n, progress=False, checkpoint_every=10_000,
              memory={"enabled": False})
    kw.update(extra)
    return kw


def deep_update(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def run_config(spec: dict[str, Any]) -> Any:
    """The TrainConfig of one run: the shared base, then (arms) the arm's overrides, from the seed's SFT model."""
    from critique_rl.config import TrainConfig, from_dict

    kw = base_config(spec["task"], spec["seed"], Path(spec["out"]), spec["max_steps"], spec["eval_every"],
                     spec["eval_n"], spec["extra"])
    if spec["arm"] == "sft":
        kw.update(max_steps=0, eval_every=0, task=spec.get("sft_task") or spec["task"])
    else:
        kw = deep_update(kw, ARMS[spec["arm"]])
        kw = deep_update(kw, spec.get("arm_extra", {}).get(spec["arm"], {}))  # a caller's per-arm settings
        kw.update({k: ARMS[spec["arm"]][k] for k in REPLACED if k in ARMS[spec["arm"]]})
        kw.update(model=spec["model_dir"], sft_steps=0)
    return from_dict(TrainConfig, kw)  # not load_config: its keyword overrides drop None (offpolicy_gamma: null)


# ----------------------------------------------------------------------------------------------------------
# worker (one process per SFT warm-up or arm run)
# ----------------------------------------------------------------------------------------------------------
def work(spec: dict[str, Any]) -> None:
    import torch

    from critique_rl.train.metrics import read_jsonl
    from critique_rl.train.trainer import CritiqueGRPOTrainer

    torch.set_num_threads(int(spec.get("threads", 1)))
    out = Path(spec["out"])
    shutil.rmtree(out, ignore_errors=True)  # an unfinished run starts over
    cfg = run_config(spec)
    t0 = time.perf_counter()
    summary = CritiqueGRPOTrainer(args=cfg).train()
    rows = read_jsonl(out / "metrics.jsonl")
    steps = [r for r in rows if "loss/total" in r]
    curve = [(r["step"], r["eval/accuracy"]) for r in rows if r.get("eval/accuracy") is not None]

    def mean(key: str, part: slice = slice(None)) -> float | None:
        vals = [r[key] for r in steps[part] if r.get(key) is not None]
        return float(np.mean(vals)) if vals else None

    result = {"task": spec["task"], "seed": spec["seed"], "arm": spec["arm"],
              "before": summary["eval_accuracy_before_rl"], "after": summary["eval_accuracy_after_rl"],
              "eval_n": summary["eval_n"], "steps": summary["steps"], "curve": curve,
              "before_by_task": summary.get("eval_accuracy_before_rl_by_task"),
              "after_by_task": summary.get("eval_accuracy_after_rl_by_task"),
              "task_order": summary.get("task_order"), "task_entropy": summary.get("task_entropy"),
              "wall_s": time.perf_counter() - t0,
              "means": {k: mean(k) for k in METRICS},
              "means_first_quarter": {k: mean(k, slice(0, max(1, len(steps) // 4))) for k in METRICS},
              "means_last_quarter": {k: mean(k, slice(-max(1, len(steps) // 4), None)) for k in METRICS}}
    (out / "result.json").write_text(json.dumps(result, indent=1))


# ----------------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------------
def launch(spec: dict[str, Any], log: Path) -> dict[str, Any]:
    result = Path(spec["out"]) / "result.json"
    if result.is_file():
        return json.loads(result.read_text())
    env = dict(os.environ, OMP_NUM_THREADS=str(spec.get("threads", 1)), MKL_NUM_THREADS=str(spec.get("threads", 1)))
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], stdout=fh,
                              stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0 or not result.is_file():
        raise RuntimeError(f"{spec['arm']} seed {spec['seed']} failed (exit {proc.returncode}); see {log}")
    print(f"  done {spec['arm']:<26} seed {spec['seed']}  {time.perf_counter() - t0:6.0f} s", flush=True)
    return json.loads(result.read_text())


def run_all(args: argparse.Namespace, extra: dict[str, Any]) -> list[dict[str, Any]]:
    root = Path(args.out)
    (root / "logs").mkdir(parents=True, exist_ok=True)
    common = dict(task=args.task, sft_task=args.sft_task, max_steps=args.max_steps, eval_every=args.eval_every,
                  eval_n=args.eval_n, extra=extra, threads=args.threads, arm_extra=getattr(args, "arm_extra", {}))
    (root / "setup.json").write_text(json.dumps({**common, "arms": args.arms, "seeds": args.seeds}, indent=1))

    def seed_chain(seed: int, pool: ThreadPoolExecutor) -> list[Future]:
        """The seed's SFT, then its arms queued at once (they start as workers free up)."""
        sft = dict(common, arm="sft", seed=seed, out=str(root / f"sft_s{seed}"))
        launch(sft, root / "logs" / f"sft_s{seed}.log")
        specs = [dict(common, arm=arm, seed=seed, out=str(root / f"{arm}_s{seed}"),
                      model_dir=str(root / f"sft_s{seed}" / "final")) for arm in args.arms]
        return [pool.submit(launch, s, root / "logs" / f"{s['arm']}_s{seed}.log") for s in specs]

    with ThreadPoolExecutor(args.jobs) as pool, ThreadPoolExecutor(len(args.seeds)) as chains:
        seed_futures = [chains.submit(seed_chain, seed, pool) for seed in args.seeds]
        results = [f.result() for sf in seed_futures for f in sf.result()]
    (root / "results.json").write_text(json.dumps(results, indent=1))
    return results


def fmt(x: float | None, pct: bool = True) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}" if pct else f"{x:.3f}"


def task_table(results: list[dict[str, Any]], arms: list[str], seeds: list[int],
               by: dict[tuple[str, int], dict[str, Any]]) -> list[str]:
    """Runs on several tasks: held-out accuracy per task before / after RL (mean over seeds) and the order
    each arm trained the tasks in (seed by seed)."""
    names = list(dict.fromkeys(n for r in results for n in (r.get("after_by_task") or {})))
    if not names:
        return []
    lines = ["", "| arm | " + " | ".join(f"{n} before → after (per seed)" for n in names)
             + " | task order (per seed) | output entropy at RL start (mean) |",
             "|---|" + "---|" * len(names) + "---|---|"]
    for arm in arms:
        rs = [by[(arm, s)] for s in seeds if (arm, s) in by]
        cells = []
        for n in names:
            b = np.mean([r["before_by_task"][n] for r in rs])
            a = [r["after_by_task"][n] for r in rs]
            cells.append(f"{100 * b:.1f}% → {100 * np.mean(a):.1f}% ({' / '.join(f'{100 * x:.1f}' for x in a)})")
        orders = [" → ".join(blk["task"] for blk in r["task_order"]) if r.get("task_order") else "joint" for r in rs]
        ent = [r["task_entropy"] for r in rs if r.get("task_entropy")]
        ent_cell = ", ".join(f"{n} {np.mean([e[n] for e in ent]):.2f}" for n in names) if ent else "-"
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {'; '.join(orders)} | {ent_cell} |")
    return lines


def report(results: list[dict[str, Any]], root: Path, baseline: str, command: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(r["arm"] for r in results))
    seeds = sorted({r["seed"] for r in results})
    by = {(r["arm"], r["seed"]): r for r in results}
    lines = [f"`{command}`", "",
             f"| arm | before RL | after RL, mean ± std over {len(seeds)} seeds | gain | after - {baseline} per seed "
             "| mean paired diff | refine success | refinements' share of the update | mean log-prob of refinement "
             "tokens under the plain prompt, first → last quarter |",
             "|---|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        rs = [by[(arm, s)] for s in seeds if (arm, s) in by]
        after = np.array([r["after"] for r in rs])
        before = np.array([r["before"] for r in rs])
        diffs = [by[(arm, s)]["after"] - by[(baseline, s)]["after"] for s in seeds
                 if (arm, s) in by and (baseline, s) in by]
        share = [r["means"]["offpolicy/grad_weight_share"] for r in rs if r["means"]["offpolicy/grad_weight_share"]
                 is not None]
        lp0 = [r["means_first_quarter"]["offpolicy/logp_mean"] for r in rs
               if r["means_first_quarter"]["offpolicy/logp_mean"] is not None]
        lp1 = [r["means_last_quarter"]["offpolicy/logp_mean"] for r in rs
               if r["means_last_quarter"]["offpolicy/logp_mean"] is not None]
        succ = [r["means"]["critique/refine_success_rate"] for r in rs
                if r["means"]["critique/refine_success_rate"] is not None]
        lines.append(
            f"| {arm} | {100 * before.mean():.1f}% | {100 * after.mean():.1f}% ± {100 * after.std():.1f} "
            f"| {100 * (after - before).mean():+.1f} | "
            + (" / ".join(f"{100 * d:+.1f}" for d in diffs) if arm != baseline else "-")
            + f" | {(f'{100 * np.mean(diffs):+.1f}' if diffs and arm != baseline else '-')}"
            + f" | {(f'{100 * np.mean(succ):.0f}%' if succ else '-')}"
            + f" | {(f'{np.mean(share):.2f}' if share else '-')}"
            + f" | {(f'{np.mean(lp0):.2f} → {np.mean(lp1):.2f}' if lp0 and lp1 else '-')} |")
    lines += task_table(results, arms, seeds, by)
    table = "\n".join(lines)
    (root / "results.md").write_text(table + "\n")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm in arms:
        curves = [dict(by[(arm, s)]["curve"]) for s in seeds if (arm, s) in by]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if steps:
            ax.plot(steps, [100 * np.mean([c[t] for c in curves]) for t in steps], marker="o", ms=3, label=arm)
    ax.set_xlabel("RL step")
    ax.set_ylabel("held-out greedy accuracy (%), mean over seeds")
    ax.set_title(f"{results[0]['task']}: every arm from the same SFT start per seed")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(root / "curves.png", dpi=110)
    plt.close(fig)
    return table


def parse_set(items: list[str]) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        node = extra
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return extra


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        work(json.loads(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="addition_carry")
    ap.add_argument("--sft-task", default=None,
                    help="task of the SFT warm-up when it differs from --task (e.g. warm up on trap_plateau, where the "
                         "demonstrator shows both rules, then run RL on trap_plateau_only)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=["grpo", "grpo+reference", "critique", "critique_unshaped"],
                    choices=sorted(ARMS))
    ap.add_argument("--baseline", default="grpo", help="arm the paired differences are taken against")
    ap.add_argument("--max-steps", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--eval-n", type=int, default=300)
    ap.add_argument("--jobs", type=int, default=2, help="arm runs in parallel (the SFT warm-ups, one per seed, run beside them)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--set", nargs="*", default=[], help="key=value (YAML) for the warm-up and every arm")
    ap.add_argument("--out", default="benchmarks/results/learning_evidence/run")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: tabulate the finished runs of --arms x --seeds found under --out")
    args = ap.parse_args()
    if args.baseline not in args.arms:
        ap.error(f"--baseline {args.baseline} is not among --arms")
    command = "python benchmarks/learning_evidence.py " + " ".join(sys.argv[1:])
    t0 = time.perf_counter()
    if args.report_only:
        found = [Path(args.out) / f"{arm}_s{seed}" / "result.json" for arm in args.arms for seed in args.seeds]
        results = [json.loads(f.read_text()) for f in found if f.is_file()]
        (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1))
    else:
        results = run_all(args, parse_set(args.set))
    print(report(results, Path(args.out), args.baseline, command))
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
