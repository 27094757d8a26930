"""Held-out greedy accuracy of saved policies split by question tag: on the trap tasks, where did RL move?

    python benchmarks/accuracy_by_tag.py --task trap_half --n 300 \
        benchmarks/results/learning_evidence/trap_half/{grpo,critique_unshaped}_s0/final

Same held-out rows as the trainer's eval (``EVAL_SEED``). Prints, per model, the accuracy on the trap tags
(``row["trap"]``), on the other tags and per tag, and writes the same as JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any


def accuracy_by_tag(model_dir: Path, task_name: str, n: int) -> dict[str, Any]:
    from critique_rl.tasks import get_task
    from critique_rl.train.evaluate import EVAL_SEED, evaluate_saved

    rows = get_task(task_name).make_examples("eval", n, EVAL_SEED)[:n]
    records: list = []
    result = evaluate_saved(model_dir, task_name, rows=rows, records_out=records)
    hits: dict[str, list[bool]] = defaultdict(list)
    for row, rec in zip(rows, records, strict=True):
        hits[f"tag/{row.get('tag', '-')}"].append(bool(rec[0]))
        hits["trap" if row.get("trap") else "other"].append(bool(rec[0]))
    out = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    return {"model": str(model_dir), "accuracy": result["accuracy"], **out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--task", default="trap_half")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    results = []
    for m in args.models:
        r = accuracy_by_tag(m, args.task, args.n)
        results.append(r)
        print(f"{m}: all {100 * r['accuracy']:.1f}%  trap tags {100 * r.get('trap', float('nan')):.1f}%  "
              f"other tags {100 * r.get('other', float('nan')):.1f}%")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
