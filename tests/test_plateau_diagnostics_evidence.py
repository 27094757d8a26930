"""benchmarks/plateau_diagnostics_evidence.py on a hand-made run folder (hand-computed means)."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_table_means_per_quarter(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import plateau_diagnostics_evidence as pd

    run = tmp_path / "critique_s0"
    run.mkdir()
    steps = [{"step": i, "loss/total": 1.0, "critique/groups_rescued": float(i), "train/accuracy": 0.25 * (i % 2),
              "offpolicy/grad_weight_share": 0.5 if i < 2 else 0.1, "offpolicy/logp_mean": -2.0 + 0.5 * i}
             for i in range(8)]
    lines = [json.dumps({"step": 0, "eval/accuracy": 0.0})] + [json.dumps(s) for s in steps]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "result.json").write_text(json.dumps({"after": 0.5}))
    d = pd.diagnostics(pd.steps_of(run)[:2], 96)
    assert d["right_refinements"] == 0.5 and d["right_onpolicy"] == 12.0 and d["share"] == 0.5
    assert d["logp"] == -1.75 and d["distill"] is None
    text = pd.table(tmp_path, ["critique", "missing"], [0], 96)
    row = text.splitlines()[-1]
    # first quarter = steps 0-1; all = steps 0-7: rescued 0.5; 3.5, on-policy 12.0; 12.0, share 0.50; 0.20,
    # log-prob first quarter -1.75 -> last quarter (steps 6-7) 1.25
    assert row == "| critique | 0 | 50.0% | 0.5; 3.5 | 12.0; 12.0 | 0.50; 0.20 | -1.75 → 1.25 | - |"
