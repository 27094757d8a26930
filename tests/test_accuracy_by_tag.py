"""benchmarks/accuracy_by_tag.py: per-tag held-out accuracy of a saved policy agrees with the trainer's eval."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from critique_rl import CritiqueGRPOTrainer

ROOT = Path(__file__).resolve().parents[1]


def test_split_accuracies_recombine_to_the_trainers_eval(fast_config):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import accuracy_by_tag as abt

    cfg = fast_config(task="trap_half", max_steps=0, eval_every=0, eval_n=40, sft_steps=60)
    summary = CritiqueGRPOTrainer(args=cfg).train()
    r = abt.accuracy_by_tag(Path(cfg.output_dir) / "final", "trap_half", 40)
    saved = json.loads((Path(cfg.output_dir) / "summary.json").read_text())
    assert r["accuracy"] == saved["eval_accuracy_after_rl"] == summary["eval_accuracy_after_rl"]
    # trap_half's held-out rows are half on the trap tags: the two halves average to the whole
    assert abs((r["trap"] + r["other"]) / 2 - r["accuracy"]) < 1e-9
    tags = [k for k in r if k.startswith("tag/")]
    assert len(tags) == 8 and all(0.0 <= r[k] <= 1.0 for k in tags)
