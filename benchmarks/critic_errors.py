"""What critic errors cost: Critique-GRPO with an error-injecting critic, a local critic and a distilled one,
against GRPO from the same start (issue #29 item 4).

    python benchmarks/critic_errors.py --seeds 0 1 2 --local-critic DIR --distilled-critic DIR \
        --out benchmarks/results/critic_errors

One SFT warm-up per seed (the mid-range start of docs/evidence/midrange.md: task ``addition``, 1500 SFT steps at
lr 5e-4), then every arm of that seed from it, 100 RL steps, 300 held-out problems. ``--task`` / ``--sft-task`` /
``--rates`` run the same arms elsewhere, e.g. the held-out plateau (docs/evidence/critic-errors.md):
``--task constraints_plateau --sft-task constraints --rates 10 30 50 90 --eval-n 156 --set ... critic.template_dir=...``. The machinery (base config,
warm-up, worker, report table) is ``benchmarks/learning_evidence.py``'s; this file only adds the arms:

- ``grpo``: no critiques.
- ``indicative``: the ``gt`` arm with verdict-only critiques (no feedback content).
- ``gt``: Critique-GRPO as the defaults run it (a critiqued refinement in every group with a wrong answer,
  unshaped) with the rule ground-truth critic: the error-free critic (``critique_wrong_unshaped``).
- ``verdict<P>`` / ``verdict<P>_check``: the same critic with P% of its verdicts flipped (``critic.backend:
  noisy``, ``error_kind: verdict``), without / with the verifier check (regenerate, then fall back).
- ``hint<P>``: P% of the critiques of wrong answers name a wrong fix (``error_kind: hint``); their verdict is
  right, so the verifier check never fires on them (the check is on, as by default).
- ``local``: the tiny critic trained in-repo that never sees the answer (``critique-rl critic train``, passed
  with ``--local-critic``), ``reference: hidden``, verifier check on.
- ``distilled``: the critic distilled from an API critic's cache (``critique-rl critic distill``,
  ``--distilled-critic``), likewise.

- ``local_demos`` / ``distilled_demos``: the ``local`` / ``distilled`` arm from a warm-up whose refinement
  demos were written by that critic (``sft_refine_critic: run``, warm-ups ``sft_local_s<seed>`` /
  ``sft_distilled_s<seed>``; same seed, rows, tokenizer, mistakes and steps as ``sft_s<seed>``, only the
  critiques inside the refinement demos differ).

Plan of the run-demo arms (issue #29, fixed before any of them ran; wave 3 follow-up). Last session's ``local`` /
``distilled`` arms (seed 0) had 0-1% right refinements because the warm-up's refinement demos were rule
critiques only. Arms ``grpo``, ``gt`` (from ``sft_s<seed>``, rule demos), ``local_demos`` (from
``sft_local_s<seed>``), ``distilled_demos`` (from ``sft_distilled_s<seed>``); 100 RL steps, 300 held-out problems,
the critics of ``benchmarks/critic_models.py`` (local: 2000 SFT steps; distilled: 1200). Seeds in priority order
0, 1, 2, each seed whole (its warm-ups, then its arms) before the next: seed 0 reuses last session's ``sft_s0``,
``grpo_s0`` and ``gt_s0``; per seed the order is (seeds 1, 2) ``sft``, ``grpo``, ``gt``, then ``sft_local``,
``local_demos``, ``sft_distilled``, ``distilled_demos``. The gain kept is read as (arm - grpo) / (gt -
grpo) per seed and as means over the seeds that finished; the warm-ups' own held-out accuracy (``before``) is
reported beside it, since a different warm-up is a different start. After these: the error-sweep arms for
seeds 1 and 2 (lower priority).

Runs are done arm-major in the listed order (every seed of an arm before the next arm), one or ``--jobs`` at a
time; a finished run (``<arm>_s<seed>/result.json``) is skipped on a re-run. Writes ``results.json``,
``results.md`` (learning_evidence's table: mean ± std, paired difference to GRPO per seed) and ``summary.md``
(gain over GRPO per arm, share of the ground-truth critic's gain kept, the break-even error rate).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import learning_evidence as le  # noqa: E402  (F2's file: imported, not edited)

RATES = (10, 30, 50)
WRONG_UNSHAPED = {"critique_on": "wrong", "offpolicy_gamma": None}
NOISY = {"backend": "noisy", "kind": "ground_truth", "error_inner": "rule", "max_regenerations": 2,
         "fallback_kind": "auto"}
LOCAL = {"backend": "hf", "kind": "cot", "reference": "hidden", "max_tokens": 96, "max_regenerations": 1,
         "fallback_kind": "indicative"}
"""A model critic that never sees the answer; a critique whose verdict the verifier contradicts is drawn once more
(sampled), then replaced by a verdict-only rule critique (it quotes no answer either)."""


def critic_arms(local: str | None, distilled: str | None,
                rates: tuple[int, ...] = RATES) -> dict[str, dict[str, Any]]:
    """Arm name -> config overrides (on top of learning_evidence's base)."""
    arms: dict[str, dict[str, Any]] = {"grpo": {"critique_on": "none"}, "gt": dict(WRONG_UNSHAPED),
                                       "indicative": {**WRONG_UNSHAPED, "critic": dict(le.INDICATIVE)}}  # verdict-only
    if local:
        arms["local"] = {**WRONG_UNSHAPED, "critic": {**LOCAL, "model": str(Path(local).resolve())}}
        arms["local_demos"] = arms["local"]  # the same run, from the sft_local warm-up (WARMUP_OF)
        arms["grpo_local_start"] = {"critique_on": "none"}  # post hoc: GRPO from that warm-up (same start)
    if distilled:
        arms["distilled"] = {**WRONG_UNSHAPED, "critic": {**LOCAL, "model": str(Path(distilled).resolve())}}
        arms["distilled_demos"] = arms["distilled"]
        arms["grpo_distilled_start"] = {"critique_on": "none"}
    for p in rates:
        arms[f"verdict{p}"] = {**WRONG_UNSHAPED, "critic": {**NOISY, "error_rate": p / 100, "error_kind": "verdict",
                                                            "error_check": False}}
    for p in rates:
        arms[f"hint{p}"] = {**WRONG_UNSHAPED, "critic": {**NOISY, "error_rate": p / 100, "error_kind": "hint"}}
    for p in rates:
        arms[f"verdict{p}_check"] = {**WRONG_UNSHAPED, "critic": {**NOISY, "error_rate": p / 100,
                                                                  "error_kind": "verdict", "error_check": True}}
    return arms


WARMUP_OF = {"local_demos": "sft_local", "distilled_demos": "sft_distilled", "grpo_local_start": "sft_local",
             "grpo_distilled_start": "sft_distilled"}
"""Arms that start from a warm-up other than ``sft`` (the rule-demo warm-up of every other arm). The
``grpo_*_start`` arms were added after ``local_demos`` seed 0 had run (its warm-up starts 1.7 points lower than
``sft_s0``): GRPO from the same run-demo warm-up, so the model critic's arm has a baseline from its own start."""
WARMUP_CRITIC = {"sft_local": "local", "sft_distilled": "distilled"}
"""The arm whose critic writes a run-demo warm-up's refinement demos."""


def warmup_extra(warmup: str, defs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Config overrides of a warm-up beyond the shared ``--set``: with run demos, the arm's critic writes the
    refinement demos (``sft_refine_critic: run``; the warm-up builds that critic because critique_on is set)."""
    arm = WARMUP_CRITIC.get(warmup)
    if arm is None:
        return {}
    return {"sft_refine_critic": "run", "critic": defs[arm]["critic"]}


EXTRA_METRICS = ("critique/errors_delivered", "critique/errors_injected", "critique/verdict_accuracy",
                 "critique/verdict_recall_wrong", "critique/fallbacks", "critique/critiqued")


def work(spec: dict[str, Any]) -> None:
    """One arm run (a subprocess): learning_evidence's worker with this file's arms registered."""
    le.ARMS.update(spec["arm_defs"])
    le.METRICS = tuple(dict.fromkeys((*le.METRICS, *EXTRA_METRICS)))
    le.work(spec)


def launch(spec: dict[str, Any], log: Path) -> dict[str, Any]:
    result = Path(spec["out"]) / "result.json"
    if result.is_file():
        return json.loads(result.read_text())
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    script = le.__file__ if spec["arm"] == "sft" else __file__
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run([sys.executable, script, "--worker", json.dumps(spec)], stdout=fh,
                              stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0 or not result.is_file():
        raise RuntimeError(f"{spec['arm']} seed {spec['seed']} failed (exit {proc.returncode}); see {log}")
    print(f"  done {spec['arm']:<16} seed {spec['seed']}  {time.perf_counter() - t0:6.0f} s", flush=True)
    return json.loads(result.read_text())


def summary(results: list[dict[str, Any]], arms: list[str], seeds: list[int], rates: tuple[int, ...] = RATES) -> str:
    """Gain over GRPO per arm (paired by seed), the share of the ground-truth critic's gain kept, errors
    delivered, and where each error kind stops beating GRPO."""
    by = {(r["arm"], r["seed"]): r for r in results}

    def diffs(arm: str) -> list[float]:
        return [100 * (by[(arm, s)]["after"] - by[("grpo", s)]["after"]) for s in seeds
                if (arm, s) in by and ("grpo", s) in by]

    gt = diffs("gt")
    gt_mean = float(np.mean(gt)) if gt else None
    lines = ["| arm | seeds | start (warm-up) | after - GRPO, mean ± s.e. (per seed) | share of gt's gain kept | "
             "refinements right | errors delivered per step | first-try verdict accuracy | fallbacks per step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        d = diffs(arm)
        if arm == "grpo" or not d:
            continue
        se = float(np.std(d, ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
        kept = f"{np.mean(d) / gt_mean:.2f}" if gt_mean and arm != "gt" else "-"
        rs = [by[(arm, s)] for s in seeds if (arm, s) in by]

        def m(key: str, rs: list[dict[str, Any]] = rs) -> str:
            vals = [r["means"].get(key) for r in rs if r["means"].get(key) is not None]
            return f"{np.mean(vals):.2f}" if vals else "-"

        start = " / ".join(f"{100 * r['before']:.1f}" if r.get("before") is not None else "-" for r in rs)
        lines.append(f"| {arm} | {len(d)} | {start} | {np.mean(d):+.1f} ± {se:.1f} "
                     f"({' / '.join(f'{x:+.1f}' for x in d)}) | {kept} | {m('critique/refine_success_rate')} | "
                     f"{m('critique/errors_delivered')} | {m('critique/verdict_accuracy')} | {m('critique/fallbacks')} |")
    same = [(a, g) for a, g in (("gt", "grpo"), ("local_demos", "grpo_local_start"),
                                ("distilled_demos", "grpo_distilled_start")) if a in arms]
    if len(same) > 1:  # each critic arm against GRPO from its own warm-up
        lines += ["", "Against GRPO from the same warm-up (the run-demo arms start from their own warm-ups):", "",
                  "| arm | baseline | seeds | arm - baseline, mean (per seed) | share of gt's same-start gain kept |",
                  "|---|---|---|---|---|"]
        paired = {a: [(s, 100 * (by[(a, s)]["after"] - by[(g, s)]["after"])) for s in seeds
                      if (a, s) in by and (g, s) in by] for a, g in same}
        gt_same = dict(paired.get("gt", []))
        for a, g in same:
            d = paired[a]
            if not d:
                continue
            both = [x for s, x in d if s in gt_same]
            kept = (f"{np.mean(both) / np.mean([gt_same[s] for s, _ in d if s in gt_same]):.2f}"
                    if a != "gt" and both and np.mean([gt_same[s] for s, _ in d if s in gt_same]) > 0 else "-")
            lines.append(f"| {a} | {g} | {len(d)} | {np.mean([x for _, x in d]):+.1f} "
                         f"({' / '.join(f'{x:+.1f}' for _, x in d)}) | {kept} |")
    lines += ["", "Break-even (the lowest error rate whose mean gain over GRPO is <= 0):"]
    for kind in ("verdict{}", "verdict{}_check", "hint{}"):
        means = [(0, gt_mean)] + [(p, float(np.mean(diffs(kind.format(p))))) for p in rates if diffs(kind.format(p))]
        below = [p for p, v in means if v is not None and v <= 0]
        row = ", ".join(f"{p}%: {v:+.1f}" for p, v in means if v is not None)
        lines.append(f"- {kind.format('P')}: {row} -> "
                     + (f"stops beating GRPO at {below[0]}%" if below else "ahead of GRPO at every rate run"))
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        work(json.loads(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="*", default=None, help="subset of the arms, in this order (default: all)")
    ap.add_argument("--local-critic", default=None, help="directory of `critique-rl critic train` (the local arm)")
    ap.add_argument("--distilled-critic", default=None, help="directory of `critique-rl critic distill`")
    ap.add_argument("--task", default="addition", help="task of the RL runs (default: the addition mid-range start)")
    ap.add_argument("--sft-task", default=None, help="task of the warm-up when it differs from --task")
    ap.add_argument("--rates", type=int, nargs="+", default=list(RATES), help="error rates (%%) of the sweep arms")
    ap.add_argument("--max-steps", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-n", type=int, default=300)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--set", nargs="*", default=["sft_learning_rate=5e-4", "sft_steps=1500"],
                    help="key=value (YAML) for the warm-up and every arm (default: the mid-range start)")
    ap.add_argument("--out", default="benchmarks/results/critic_errors")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: tabulate the finished runs of --arms (and grpo) x --seeds under --out")
    args = ap.parse_args()
    rates = tuple(args.rates)
    defs = critic_arms(args.local_critic, args.distilled_critic, rates)
    arms = args.arms or list(defs)
    unknown = [a for a in arms if a not in defs]
    if unknown:
        ap.error(f"unknown arms {unknown} (local/distilled need --local-critic/--distilled-critic); "
                 f"choose from {list(defs)}")
    root = Path(args.out)
    (root / "logs").mkdir(parents=True, exist_ok=True)
    extra = le.parse_set(args.set)
    common = dict(task=args.task, sft_task=args.sft_task, max_steps=args.max_steps, eval_every=args.eval_every,
                  eval_n=args.eval_n, extra=extra, threads=1, arm_defs={a: defs[a] for a in arms})
    (root / "setup.json").write_text(json.dumps({**common, "arms": arms, "seeds": args.seeds}, indent=1))
    command = "python benchmarks/critic_errors.py " + " ".join(sys.argv[1:])
    t0 = time.perf_counter()
    results = []
    if not args.report_only:
        warmups = list(dict.fromkeys(WARMUP_OF.get(a, "sft") for a in arms))
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda ws: launch(dict(common, arm="sft", seed=ws[1], out=str(root / f"{ws[0]}_s{ws[1]}"),
                                                 extra={**extra, **warmup_extra(ws[0], defs)}),
                                            root / "logs" / f"{ws[0]}_s{ws[1]}.log"),
                          [(w, s) for w in warmups for s in args.seeds]))
            specs = [dict(common, arm=a, seed=s, out=str(root / f"{a}_s{s}"),
                          model_dir=str(root / f"{WARMUP_OF.get(a, 'sft')}_s{s}" / "final"))
                     for a in arms for s in args.seeds]
            futures = [pool.submit(launch, sp, root / "logs" / f"{sp['arm']}_s{sp['seed']}.log") for sp in specs]
            for f in futures:
                try:
                    results.append(f.result())
                except RuntimeError as exc:
                    print(f"  FAILED: {exc}", flush=True)
    have = {(r["arm"], r["seed"]) for r in results}
    for a in dict.fromkeys(["grpo", *arms]):  # finished runs on disk (e.g. GRPO run by an earlier invocation)
        for s in args.seeds:
            f = root / f"{a}_s{s}" / "result.json"
            if (a, s) not in have and f.is_file():
                results.append(json.loads(f.read_text()))
    arms = list(dict.fromkeys(["grpo", *arms]))
    (root / "results.json").write_text(json.dumps(results, indent=1))
    done_arms = [a for a in arms if any(r["arm"] == a for r in results)]
    table = le.report(results, root, "grpo", command) if any(r["arm"] == "grpo" for r in results) else ""
    text = summary(results, done_arms, args.seeds, rates)
    (root / "summary.md").write_text(f"`{command}`\n\n{text}\n")
    print(table)
    print(text)
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
