"""Can a warmed-up policy read a critic's critiques? Refinement success before any RL (issue #29).

    python benchmarks/critic_literacy.py --warmups rule=benchmarks/results/critic_errors/sft_s0/final \
        local=benchmarks/results/critic_errors/sft_local_s0/final \
        --critics local=benchmarks/results/critic_models/local \
        distilled=benchmarks/results/critic_models_distilled/distilled --n 300

For ``--n`` held-out problems of ``addition``'s eval split that have the task's typical mistake, each critic
(the rule ground-truth critique, and each model critic as the critic_errors arms run it: ``reference: hidden``,
one sampled regeneration when the verifier contradicts its verdict, then the indicative rule critique) critiques
the mistaken answer once; each warm-up then answers every refinement prompt greedily (what the policy does on its
first RL step) and the answer is checked by the verifier. Critiques whose verdict is not "incorrect" after the
check would be dropped from a warm-up's demos; here they are kept, as a run would show them to the policy.
Writes ``--out`` (JSON) and prints a table: refinement success per (warm-up, critic), and each critic's
fallback share.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from critic_errors import LOCAL  # noqa: E402


def _pairs(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"expected NAME=DIR, got {item!r}")
        out[name] = path
    return out


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from critique_rl.config_sections import CriticConfig
    from critique_rl.critics import build_critic
    from critique_rl.critics.base import CritiqueRequest, render_rule
    from critique_rl.rollout.hf import HFGenerator
    from critique_rl.tasks import get_task
    from critique_rl.train.critique_step import refine_text
    from critique_rl.train.evaluate import greedy_records

    torch.set_num_threads(1)
    torch.manual_seed(0)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warmups", nargs="+", required=True, help="NAME=DIR of warmed-up policies")
    ap.add_argument("--critics", nargs="*", default=[], help="NAME=DIR of model critics (the rule critic is always in)")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--out", default="benchmarks/results/critic_errors/literacy.json")
    args = ap.parse_args()
    task = get_task("addition")
    rows = [r for r in task.make_examples("eval", 4 * args.n, 0) if task.mistake(r) is not None][: args.n]
    requests = [CritiqueRequest(question=r["prompt"], response=task.mistake(r), reference=r["answer"], verdict=False,
                                metadata={"answer": task.extract(task.mistake(r)) or task.mistake(r)}) for r in rows]
    critiques: dict[str, list[str]] = {"rule": [render_rule("ground_truth", q) for q in requests]}
    fallbacks: dict[str, float] = {"rule": 0.0}
    for name, path in _pairs(args.critics).items():
        t0 = time.perf_counter()
        critic = build_critic(CriticConfig(**{**LOCAL, "model": str(Path(path).resolve())}))
        got = critic.critique(requests)
        critiques[name] = [c.text for c in got]
        fallbacks[name] = sum(c.fallback for c in got) / len(got)
        print(f"critic {name}: {len(got)} critiques, fallbacks {fallbacks[name]:.2f} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    result: dict[str, Any] = {"n": len(rows), "fallback_share": fallbacks, "success": {}}
    for wname, wdir in _pairs(args.warmups).items():
        tok = AutoTokenizer.from_pretrained(wdir)
        model = AutoModelForCausalLM.from_pretrained(wdir).eval()
        gen = HFGenerator(model, tok, batch_size=256)
        plain = greedy_records(gen, rows, lambda r: r["prompt"], task.verify, task.max_new_tokens)
        result["success"].setdefault("plain (no critique)", {})[wname] = sum(r[0] for r in plain) / len(rows)
        for cname, texts in critiques.items():
            refine_rows = [{"prompt": refine_text(r["prompt"], q.response, c), "answer": r["answer"]}
                           for r, q, c in zip(rows, requests, texts, strict=True)]
            recs = greedy_records(gen, refine_rows, lambda r: r["prompt"], task.verify, task.max_new_tokens)
            result["success"].setdefault(cname, {})[wname] = sum(r[0] for r in recs) / len(rows)
        print(f"warm-up {wname}: " + ", ".join(f"{c} {v[wname]:.2f}" for c, v in result["success"].items()), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    names = list(_pairs(args.warmups))
    print("| critique shown | " + " | ".join(f"warm-up {w}" for w in names) + " |")
    print("|---|" + "---|" * len(names))
    for cname, by in result["success"].items():
        print(f"| {cname} | " + " | ".join(f"{100 * by[w]:.0f}%" for w in names) + " |")


if __name__ == "__main__":
    main()
