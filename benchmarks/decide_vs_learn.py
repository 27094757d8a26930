"""Deciding apart from learning (issue #14 item 5): post-hoc thresholding vs an asymmetric reward, same utility.

The user's utility: +1 for a right answer, -2 for a wrong one, 0 for abstaining (so answering pays only when
P(right) >= 2/3, the Bayes threshold). Two ways to get a policy that acts on it, both on ``addition_conf``
(answer then ``<confidence>q</confidence>``), plain GRPO, every arm of a seed from the same SFT checkpoint
(benchmarks/learning_evidence.py runs the training):

- ``decide_brier``: train on a symmetric objective (correctness + Brier, RLCR), then fit the abstention
  threshold on a validation split (:func:`critique_rl.train.decision.fit_rule`, as ``critique-rl calibrate``
  does) and apply it to the test split;
- ``decide_utility``: train on the utility itself (``selective_utility`` reward: the policy abstains by stating
  q < 2/3) and act by that rule on the test split.

Both are scored by the same utility on the same held-out test problems (the trainer's held-out set, 500
problems); the validation split is 500 other problems of the eval split (test prompts removed).

    python benchmarks/decide_vs_learn.py --seeds 0 1 2 --max-steps 200 --jobs 2

Writes results.json / results.md under --out (default benchmarks/results/decide_vs_learn).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import learning_evidence as le  # noqa: E402

ARMS = ["decide_brier", "decide_utility"]
UTILITY = {"reward_right": 1.0, "penalty_wrong": 2.0, "abstain_value": 0.0}
VALIDATION_SEED = 777


def records(model_dir: Path, rows: list[dict[str, Any]]) -> tuple[list[float | None], list[bool]]:
    """Greedy answers of the saved policy on ``rows``: (stated confidence or None, right)."""
    from critique_rl.models import format_prompt, load_policy, wants_chat_template
    from critique_rl.rewards.builtin import parse_confidence
    from critique_rl.rollout.factory import build_generator
    from critique_rl.tasks import get_task
    from critique_rl.train.evaluate import evaluate

    task = get_task("addition_conf")
    model, tok = load_policy(model_dir, device="cpu")
    chat = wants_chat_template(tok)
    out: list = []
    evaluate(build_generator("hf", model, tok), rows, lambda r: format_prompt(tok, r["prompt"], chat), task.verify,
             task.max_new_tokens, batch_size=250, confidence_fn=parse_confidence, records_out=out)
    return [r[2] for r in out], [r[0] for r in out]


def decide(run_dir: Path, arm: str, val: list[dict], test: list[dict]) -> dict[str, Any]:
    from critique_rl.train.decision import Utility, bayes_threshold, fit_rule, selective_scores

    u = Utility(**UTILITY)
    qv, cv = records(run_dir / "final", val)
    qt, ct = records(run_dir / "final", test)
    as_q = [0.0 if q is None else q for q in qt]  # no confidence: never answered (the rule's convention)
    fitted = fit_rule(qv, cv, u)
    out = {"accuracy": float(np.mean(ct)), "unparsable": float(np.mean([q is None for q in qt])),
           "answer_all": selective_scores(as_q, ct, 0.0, u),
           "bayes_rule": selective_scores(as_q, ct, bayes_threshold(u), u),
           "fitted_threshold": fitted.threshold,
           "fitted_rule": selective_scores(as_q, ct, fitted.threshold, u),
           "distinct_q": len({q for q in qt if q is not None})}
    # the arm's own way of deciding: brier -> the threshold fitted on validation; utility -> the trained rule
    out["deployed"] = out["fitted_rule"] if arm == "decide_brier" else out["bayes_rule"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--max-steps", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-n", type=int, default=500)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=[], help="key=value (YAML) for the warm-up and both arms")
    ap.add_argument("--penalty-wrong", type=float, default=2.0,
                    help="the utility's penalty for a wrong answer (right +1, abstain 0): in the decide_utility "
                         "arm's reward and in every score")
    ap.add_argument("--out", default="benchmarks/results/decide_vs_learn")
    args = ap.parse_args()
    UTILITY["penalty_wrong"] = args.penalty_wrong
    from critique_rl.tasks import get_task
    from critique_rl.train.evaluate import EVAL_SEED

    train_args = argparse.Namespace(task="addition_conf", seeds=args.seeds, arms=ARMS, max_steps=args.max_steps,
                                    eval_every=args.eval_every, eval_n=args.eval_n, jobs=args.jobs, threads=1,
                                    out=args.out,
                                    arm_extra={"decide_utility": {"reward_kwargs": {"selective_utility": UTILITY}}})
    command = "python benchmarks/decide_vs_learn.py " + " ".join(sys.argv[1:])
    le.report(le.run_all(train_args, le.parse_set(args.set)), Path(args.out), "decide_brier", command)
    task = get_task("addition_conf")
    test = task.make_examples("eval", args.eval_n, EVAL_SEED)[: args.eval_n]
    seen = {r["prompt"] for r in test}
    val = [r for r in task.make_examples("eval", 3 * args.eval_n, VALIDATION_SEED) if r["prompt"] not in seen]
    val = val[: args.eval_n]
    results = []
    for seed in args.seeds:
        for arm in ARMS:
            r = decide(Path(args.out) / f"{arm}_s{seed}", arm, val, test)
            results.append({"seed": seed, "arm": arm, **r})
            print(f"seed {seed} {arm}: accuracy {r['accuracy']:.3f}, deployed utility {r['deployed']['utility']:+.3f} "
                  f"(coverage {r['deployed']['coverage']:.2f})", flush=True)
    Path(args.out, "decisions.json").write_text(json.dumps({"utility": UTILITY, "n_val": len(val),
                                                            "n_test": len(test), "results": results}, indent=1))
    lines = [f"`{command}`", "",
             f"Utility +{UTILITY['reward_right']:g} right / -{UTILITY['penalty_wrong']:g} wrong / "
             f"{UTILITY['abstain_value']:g} abstain; {len(val)} validation, {len(test)} test problems; "
             "mean ± std over seeds (per seed in brackets).", "",
             "| arm | accuracy | deployed rule | utility (deployed) | coverage | accuracy when answering | utility, "
             "answer all | utility, q >= Bayes threshold | utility, threshold fitted on validation | distinct q |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def ms(vals: list[float], digits: int = 3) -> str:
        return f"{np.mean(vals):+.{digits}f} ± {np.std(vals):.{digits}f} ({' / '.join(f'{v:+.{digits}f}' for v in vals)})"

    from critique_rl.train.decision import Utility, bayes_threshold

    bayes = bayes_threshold(Utility(**UTILITY))
    for arm in ARMS:
        rs = [r for r in results if r["arm"] == arm]
        sel = [r["deployed"]["selective_accuracy"] for r in rs if r["deployed"]["selective_accuracy"] is not None]
        lines.append(
            f"| {arm} | {np.mean([r['accuracy'] for r in rs]):.3f} | "
            f"{'threshold fitted on validation' if arm == 'decide_brier' else f'trained: q >= {bayes:.2f}'} | "
            f"{ms([r['deployed']['utility'] for r in rs])} | {np.mean([r['deployed']['coverage'] for r in rs]):.2f} | "
            f"{(f'{np.mean(sel):.3f}' if sel else '-')} | {ms([r['answer_all']['utility'] for r in rs])} | "
            f"{ms([r['bayes_rule']['utility'] for r in rs])} | {ms([r['fitted_rule']['utility'] for r in rs])} | "
            f"{np.mean([r['distinct_q'] for r in rs]):.1f} |")
    diffs = [next(r for r in results if r["seed"] == s and r["arm"] == "decide_brier")["deployed"]["utility"]
             - next(r for r in results if r["seed"] == s and r["arm"] == "decide_utility")["deployed"]["utility"]
             for s in args.seeds]
    lines += ["", f"Post-hoc minus asymmetric-reward utility, paired per seed: {ms(diffs)}."]
    Path(args.out, "decisions.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
