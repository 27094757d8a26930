"""examples/memory_demo.py runs end to end (tiny settings) and prints its table and what memory added."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_memory_demo_runs_and_prints_what_memory_added(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "memory_demo.py"), "--steps", "1", "--sft-steps",
                          "10", "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    for row in ("before RL (warm-up only)", "RL alone", "RL + memory", "RL + memory, bank removed"):
        assert re.search(rf"\| {re.escape(row)}\s+\|\s+\d+\.\d%", res.stdout), row
    assert re.search(r"what memory added: [+-]\d+\.\d points at equal steps \(\d+ lessons", res.stdout)
    assert (tmp_path / "RL_plus_memory" / "memory.sqlite").is_file()
