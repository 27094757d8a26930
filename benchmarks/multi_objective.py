"""Multi-objective rewards, evidence over seeds (issue 5, part 8 (b) and (c)): weight robustness, diversity.

Side-by-side comparisons on the tiny model and the ``addition_conf`` task (two-digit addition, answer then
``<confidence>q</confidence>``). Per seed, one SFT warm-up (the demo's imperfect demonstrator,
``sft_mistake_rate`` 0.6) is trained once and every RL arm of that seed starts from that same checkpoint,
with the same RL steps, batch, learning rate and held-out set; only the compared setting differs.
Part (a), calibration, lives in benchmarks/calibration_brier.py (it imports this module's helpers).

(b) robustness to weights: objectives [correctness, format] (format: the whole completion matches
    ``<int> <confidence>q</confidence>``), aggregator ``weighted_sum`` vs ``dvao`` (arXiv:2605.25604), weights
    [1, 1], [1, 10], [10, 1]. Reported: final greedy accuracy per setting and its spread (max - min, std)
    across the weight settings, per aggregator.
(c) diversity: ``advantage_estimator`` grpo vs w_reinforce (arXiv:2506.01347), [correctness] reward.
    Reported: pass@1, pass@4, pass@16 with the unbiased estimator from n = 16 samples per problem
    (temperature 1, as in training), plus greedy accuracy.

``--critiques off`` (default) trains plain group RL (``critique_on: none``, no distillation) so the
compared setting is the only mechanism at work; ``--critiques on`` keeps the demo's Critique-GRPO settings.

Usage: python benchmarks/multi_objective.py [--seeds 0 1 2] [--max-steps 200] [--critiques off|on] [--jobs 1]
       [--work DIR [--reuse-sft]] [--out benchmarks/results/multi_objective]
Writes <out>.md (tables, mean +- std over seeds) and <out>.json (raw numbers per seed and arm).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from critique_rl.config import load_config  # noqa: E402
from critique_rl.models import format_prompt, load_policy, wants_chat_template  # noqa: E402
from critique_rl.rollout import HFGenerator, SamplingParams  # noqa: E402
from critique_rl.tasks import get_task  # noqa: E402
from critique_rl.train.evaluate import (
    EVAL_SEED,  # noqa: E402
    pass_at_k,  # noqa: E402
)
from critique_rl.train.trainer import CritiqueGRPOTrainer  # noqa: E402

TASK = "addition_conf"
WEIGHTS = [[1.0, 1.0], [1.0, 10.0], [10.0, 1.0]]
KS = (1, 4, 16)


def train(out: Path, seed: int, args: argparse.Namespace, **overrides: Any) -> dict[str, Any]:
    """One trainer run (demo preset, task addition_conf); returns its summary plus wall seconds."""
    cfg = load_config(None, output_dir=str(out), progress=False, task=TASK, seed=seed, eval_n=args.eval_n,
                      eval_batch_size=args.eval_n, checkpoint_every=10**6, **overrides)
    t0 = time.perf_counter()
    summary = CritiqueGRPOTrainer(args=cfg).train()
    summary["arm_seconds"] = time.perf_counter() - t0
    return summary


def sft_checkpoint(work: Path, seed: int, args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """SFT warm-up only (max_steps 0); every RL arm of this seed starts from ``<dir>/final``."""
    out = work / f"seed{seed}" / "sft"
    if args.reuse_sft and (out / "summary.json").is_file() and (out / "final" / "config.json").is_file():
        return out / "final", {**json.loads((out / "summary.json").read_text()), "arm_seconds": 0.0}
    summary = train(out, seed, args, max_steps=0)
    return out / "final", summary


def rl(work: Path, name: str, seed: int, sft_dir: Path, args: argparse.Namespace, **overrides: Any) -> tuple[Path, dict]:
    out = work / f"seed{seed}" / name
    if getattr(args, "critiques", "on") == "off":
        overrides = {"critique_on": "none", "distill_weight": 0.0} | overrides
    shutil.rmtree(out, ignore_errors=True)  # an arm is re-run from its SFT checkpoint, never resumed
    summary = train(out, seed, args, model=str(sft_dir), sft_steps=0, max_steps=args.max_steps, **overrides)
    return out / "final", summary


def sampled_pass_at_k(model_dir: Path, n_problems: int, n: int, ks: tuple[int, ...]) -> dict[str, float]:
    """Mean unbiased pass@k over ``n_problems`` held-out problems from ``n`` samples each at temperature 1."""
    task = get_task(TASK)
    rows = task.make_examples("eval", n_problems, EVAL_SEED)[:n_problems]
    model, tok = load_policy(model_dir, device="cpu")
    use_chat = wants_chat_template(tok, "auto")
    gen = HFGenerator(model, tok, batch_size=512)
    prompts = [format_prompt(tok, r["prompt"], use_chat) for r in rows]
    groups = gen.generate(prompts, SamplingParams(n=n, temperature=1.0, max_new_tokens=task.max_new_tokens))
    totals = dict.fromkeys(ks, 0.0)
    for row, group in zip(rows, groups, strict=True):
        c = sum(bool(task.verify(x.text, row["answer"])) for x in group)
        for k in ks:
            totals[k] += pass_at_k(n, c, k)
    return {f"pass@{k}": totals[k] / len(rows) for k in ks}


# ---------------------------------------------------------------------------------------------------------
# statistics and tables
# ---------------------------------------------------------------------------------------------------------
def ms(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    """``mean ± std`` (sample std over seeds; 0 with one seed), scaled."""
    v = [x * scale for x in values]
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{statistics.mean(v):.{digits}f} ± {sd:.{digits}f}"


def spread(values: list[float]) -> tuple[float, float]:
    """(max - min, population std) of one seed's accuracies across weight settings."""
    return max(values) - min(values), statistics.pstdev(values)


def tables(res: dict[str, Any]) -> str:
    seeds = res["seeds"]
    per = res["per_seed"]
    lines: list[str] = []

    lines += ["## (b) Robustness to weights: [correctness, format], weighted_sum vs dvao", "",
              "Final greedy accuracy (%) per weight setting [b_correctness, b_format]; spread = max - min and "
              "population std across the three settings, computed per seed then mean ± std over seeds.", "",
              "| aggregator | " + " | ".join(str(w) for w in WEIGHTS) + " | spread (max-min) | spread (std) |",
              "|---|" + "---|" * (len(WEIGHTS) + 2)]
    for agg in ("weighted_sum", "dvao"):
        accs = [ms([per[str(s)]["weights"][agg][str(w)]["accuracy"] for s in seeds], 100) for w in WEIGHTS]
        rng = [per[str(s)]["weights"][agg]["spread_range"] for s in seeds]
        sd = [per[str(s)]["weights"][agg]["spread_std"] for s in seeds]
        lines.append(f"| {agg} | " + " | ".join(accs) + f" | {ms(rng, 100)} | {ms(sd, 100)} |")
    lines += ["", "Format pass rate (%) of the greedy answers, same layout:", "",
              "| aggregator | " + " | ".join(str(w) for w in WEIGHTS) + " |", "|---|" + "---|" * len(WEIGHTS)]
    for agg in ("weighted_sum", "dvao"):
        fm = [ms([per[str(s)]["weights"][agg][str(w)]["format_rate"] for s in seeds], 100) for w in WEIGHTS]
        lines.append(f"| {agg} | " + " | ".join(fm) + " |")
    lines.append("")

    lines += ["## (c) Diversity: grpo vs w_reinforce, [correctness]", "",
              f"pass@k (%) with the unbiased estimator from n = {res['settings']['passk_samples']} samples per problem "
              f"(temperature 1) on {res['settings']['passk_n']} held-out problems; greedy accuracy on "
              f"{res['settings']['eval_n']}.", "",
              "| estimator | greedy acc | " + " | ".join(f"pass@{k}" for k in KS) + " |",
              "|---|---|" + "---|" * len(KS)]
    for arm in ("sft", "grpo", "w_reinforce"):
        d = lambda key, arm=arm: [per[str(s)]["diversity"][arm][key] for s in seeds]  # noqa: E731
        label = "after SFT (start)" if arm == "sft" else arm
        lines.append(f"| {label} | {ms(d('accuracy'), 100)} | " + " | ".join(ms(d(f'pass@{k}'), 100) for k in KS) + " |")
    demo = res["settings"].get("demo_settings", {})
    lines += ["", "Shared settings (all arms): " + ", ".join(f"{k}={v}" for k, v in demo.items()) + "."]
    lines += ["", f"RL steps per arm: {res['settings']['max_steps']}; total wall time "
              f"{res['wall_seconds'] / 60:.1f} min on {res['machine']}.", ""]
    return "\n".join(lines)


def format_rate(model_dir: Path, n: int) -> float:
    """Fraction of greedy held-out completions matching the ``format`` reward's regex."""
    from critique_rl.rewards.builtin import format_ok, resolve_format_pattern

    task = get_task(TASK)
    rows = task.make_examples("eval", n, EVAL_SEED)[:n]
    model, tok = load_policy(model_dir, device="cpu")
    use_chat = wants_chat_template(tok, "auto")
    outs = HFGenerator(model, tok, batch_size=512).generate(
        [format_prompt(tok, r["prompt"], use_chat) for r in rows],
        SamplingParams(n=1, max_new_tokens=task.max_new_tokens, greedy=True))
    regex = resolve_format_pattern(task, None)
    return sum(format_ok(task, regex, g[0].text) for g in outs) / n


def run_seed(work: Path, seed: int, args: argparse.Namespace, log) -> dict[str, Any]:
    sft_dir, sft_summary = sft_checkpoint(work, seed, args)
    log(f"seed {seed}: SFT done in {sft_summary['arm_seconds']:.0f}s, acc {sft_summary['eval_accuracy_before_rl']:.3f}")
    res: dict[str, Any] = {"sft_seconds": sft_summary["arm_seconds"]}

    # (b) weights
    wres: dict[str, Any] = {}
    for agg in ("weighted_sum", "dvao"):
        wres[agg] = {}
        for w in WEIGHTS:
            final, s = rl(work, f"w_{agg}_{w[0]:g}_{w[1]:g}", seed, sft_dir, args,
                          reward_funcs=["correctness", "format"], reward_weights=w, reward_aggregator=agg)
            wres[agg][str(w)] = {"accuracy": s["eval_accuracy_after_rl"], "format_rate": format_rate(final, args.eval_n),
                                 "seconds": s["arm_seconds"]}
            log(f"seed {seed}: (b) {agg} {w}: acc {s['eval_accuracy_after_rl']:.3f} ({s['arm_seconds']:.0f}s)")
        rng, sd = spread([wres[agg][str(w)]["accuracy"] for w in WEIGHTS])
        wres[agg]["spread_range"], wres[agg]["spread_std"] = rng, sd
    res["weights"] = wres

    # (c) diversity
    div = {"sft": {"accuracy": sft_summary["eval_accuracy_before_rl"],
                   **sampled_pass_at_k(sft_dir, args.passk_n, args.passk_samples, KS)}}
    for est in ("grpo", "w_reinforce"):
        final, s = rl(work, f"div_{est}", seed, sft_dir, args, advantage_estimator=est)
        div[est] = {"accuracy": s["eval_accuracy_after_rl"], "seconds": s["arm_seconds"],
                    **sampled_pass_at_k(final, args.passk_n, args.passk_samples, KS)}
        log(f"seed {seed}: (c) {est}: " + " ".join(f"{k}={v:.3f}" for k, v in div[est].items() if k != "seconds"))
    res["diversity"] = div
    return res


def _demo_settings(critiques: str) -> dict[str, Any]:
    """The preset fields every arm shares (critiques, refinements, distillation, optimisation)."""
    off = {"critique_on": "none", "distill_weight": 0.0} if critiques == "off" else {}
    cfg = load_config(None, task=TASK, **off)
    keys = ("sft_steps", "sft_mistake_rate", "sft_refine_fraction", "learning_rate", "num_generations",
            "generation_batch_size", "critique_on", "refinements_per_group", "offpolicy_gamma", "distill_weight",
            "distill_mode", "temperature", "loss_aggregation")
    return {k: getattr(cfg, k) for k in keys} | {"critic": f"{cfg.critic.backend}/{cfg.critic.kind}"}


class _Log:
    """Progress lines on stderr with seconds since the start (picklable, for worker processes)."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0

    def __call__(self, msg: str) -> None:
        print(f"[{time.time() - self.t0:6.0f}s] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--max-steps", type=int, default=200, help="RL steps per arm (identical for all arms)")
    ap.add_argument("--critiques", choices=["off", "on"], default="off",
                    help="off: plain group RL in every arm; on: the demo's Critique-GRPO settings in every arm")
    ap.add_argument("--eval-n", type=int, default=300, help="held-out problems for greedy accuracy / ECE")
    ap.add_argument("--passk-n", type=int, default=200, help="held-out problems for pass@k")
    ap.add_argument("--passk-samples", type=int, default=16, help="samples per problem for pass@k (n)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (per process)")
    ap.add_argument("--jobs", type=int, default=1, help="seeds run in parallel processes")
    ap.add_argument("--work", default=None, help="folder for the run directories (default: a temporary one)")
    ap.add_argument("--reuse-sft", action="store_true",
                    help="reuse <work>/seed<N>/sft from an earlier run with the same seeds (same SFT settings)")
    ap.add_argument("--out", default="benchmarks/results/multi_objective", help="writes <out>.md and <out>.json")
    args = ap.parse_args()
    if args.passk_samples < max(KS):
        ap.error(f"--passk-samples must be >= {max(KS)}")
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    t_wall = time.time()

    log = _Log(t_wall)

    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="multi_objective_")
    work = Path(args.work or tmp.name)
    if args.jobs > 1:  # seeds in parallel processes (each with --threads torch threads)
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn"),
                                 initializer=torch.set_num_threads, initargs=(args.threads,)) as pool:
            futures = {s: pool.submit(run_seed, work, s, args, log) for s in args.seeds}
            per_seed = {str(s): f.result() for s, f in futures.items()}
    else:
        per_seed = {str(s): run_seed(work, s, args, log) for s in args.seeds}

    res = {
        "seeds": args.seeds,
        "settings": {"task": TASK, "max_steps": args.max_steps, "eval_n": args.eval_n, "passk_n": args.passk_n,
                     "passk_samples": args.passk_samples, "weights": WEIGHTS, "threads": args.threads,
                     "preset": "demo preset (tiny model, SFT 1000 steps, sft_mistake_rate 0.6), then RL from the SFT "
                               "checkpoint", "critiques": args.critiques, "demo_settings": _demo_settings(args.critiques)},
        "per_seed": per_seed,
        "wall_seconds": time.perf_counter() - t0,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
                   f"{args.threads} thread(s) x {args.jobs} process(es)",
    }
    md = "# Multi-objective rewards: weight robustness, diversity\n\n" + tables(res)
    print(md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
