"""Training from a critic-as-judge reward alone on a reference-free task (issue #29 item 5).

    python benchmarks/judge_learning.py --seeds 0 1 2 --out benchmarks/results/judge_learning

Task ``digit_sum`` (open-ended: any digit string of the asked length, digit sum and first digit; the ``answer``
column holds the constraints, no solution). The judge is an OpenAI-compatible server on 127.0.0.1 (the loopback
server of ``tests/critic_server.py``) that judges each response from the question alone, as a rule: it stands in
for a model judge. The run's only reward is ``critic`` (the judge's verdict), its verifier is
``judge_verdict`` (correct = the judge accepted it, also for the held-out evaluation), and ``critique_on: wrong``
refines the rejected responses with the judge's own critiques (no second call per response). Per seed: one SFT
warm-up (learning_evidence's, the task's typical mistake at ``sft_mistake_rate``), then the arm from it; "learns"
is held-out accuracy after vs before, and every run counts the judge's calls against the distinct responses judged.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
import learning_evidence as le  # noqa: E402
from critic_server import CriticServer  # noqa: E402

from critique_rl.tasks.open_ended import violations  # noqa: E402

_Q = re.compile(r"digits (\d+) sum (\d+) first (\d)")
JUDGE = {"backend": "openai", "model": "judge", "kind": "cot", "reference": "hidden", "max_regenerations": 0}
ARMS: dict[str, dict[str, Any]] = {
    "judge_critique": {"reward_funcs": ["critic"], "verifier": "critique_rl.rewards.critic_judge:judge_verdict",
                       "critique_on": "wrong", "offpolicy_gamma": None, "critic": JUDGE},
    # control: plain GRPO on the task's own verifier (the judge is exact, so the same reward, no critiques)
    "verifier_grpo": {"reward_funcs": ["correctness"], "critique_on": "none"},
}


def rule_judge(body: dict) -> dict:
    """The judge: reads the question and the response out of the critique prompt (no reference in it)."""
    prompt = body["messages"][-1]["content"]
    question = prompt.split("Question:\n", 1)[1].split("\n", 1)[0]
    response = prompt.split("Response:\n", 1)[1].split("\n\nCritique:", 1)[0].strip()
    m = _Q.search(question)
    if m is None:
        return {"content": "I cannot read the question.\nVerdict: incorrect", "usage": (50, 10)}
    broken = violations(response, f"len={m.group(1)} sum={m.group(2)} first={m.group(3)}")
    text = ("All constraints hold.\nVerdict: correct" if not broken else
            "Problem: " + "; ".join(broken) + ".\nVerdict: incorrect")
    return {"content": text, "usage": (50, 10)}


def work(spec: dict[str, Any]) -> None:
    """One arm run with its own judge server; adds the judge's call counts to result.json."""
    with CriticServer(responder=rule_judge) as srv:
        arm = dict(ARMS[spec["arm"]])
        if "critic" in arm:  # the judge arm's critic is this server
            arm["critic"] = {**arm["critic"], "base_url": srv.base_url}
        le.ARMS[spec["arm"]] = arm
        le.work(spec)
        bodies = [json.dumps(b["messages"], sort_keys=True) for b in srv.bodies]
        leaked = sum("len=" in b for b in bodies)  # the constraints column must never reach the judge
    out = Path(spec["out"]) / "result.json"
    result = json.loads(out.read_text())
    result.update(judge_calls=srv.requests, judge_distinct=len(set(bodies)), judge_prompts_with_answer=leaked)
    out.write_text(json.dumps(result, indent=1))


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        spec = json.loads(sys.argv[2])
        (le.work if spec["arm"] == "sft" else work)(spec)
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=["judge_critique"], choices=list(ARMS))
    ap.add_argument("--max-steps", type=int, default=60)
    ap.add_argument("--eval-n", type=int, default=200)
    ap.add_argument("--set", nargs="*", default=["sft_steps=1000", "sft_learning_rate=5e-4", "sft_mistake_rate=0.5"])
    ap.add_argument("--out", default="benchmarks/results/judge_learning")
    args = ap.parse_args()
    root = Path(args.out)
    (root / "logs").mkdir(parents=True, exist_ok=True)
    common = dict(task="digit_sum", sft_task=None, max_steps=args.max_steps, eval_every=args.max_steps,
                  eval_n=args.eval_n, extra=le.parse_set(args.set), threads=1)
    le.__file__ = __file__  # launch() runs this file's worker (it serves the judge)
    results = []
    for seed in args.seeds:
        le.launch(dict(common, arm="sft", seed=seed, out=str(root / f"sft_s{seed}")), root / "logs" / f"sft_s{seed}.log")
        for arm in args.arms:
            results.append(le.launch(dict(common, arm=arm, seed=seed, out=str(root / f"{arm}_s{seed}"),
                                          model_dir=str(root / f"sft_s{seed}" / "final")),
                                     root / "logs" / f"{arm}_s{seed}.log"))
    lines = [f"`python benchmarks/judge_learning.py {' '.join(sys.argv[1:])}`", "",
             "| arm | seed | held-out before | after | gain | judge calls | distinct responses judged | "
             "prompts with the answer column |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['arm']} | {r['seed']} | {100 * r['before']:.1f}% | {100 * r['after']:.1f}% | "
                     f"{100 * (r['after'] - r['before']):+.1f} | {r['judge_calls']} | {r['judge_distinct']} | "
                     f"{r['judge_prompts_with_answer']} |")
    gains = [100 * (r["after"] - r["before"]) for r in results]
    lines += ["", f"mean gain {np.mean(gains):+.1f} over {len(gains)} runs"]
    (root / "results.json").write_text(json.dumps(results, indent=1))
    (root / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
