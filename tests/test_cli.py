"""The `critique-rl` command as a user runs it: subprocesses, exit codes, one-line errors."""

import json
import subprocess
import sys

import pytest
import yaml
from conftest import FAST


def run_cli(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "critique_rl.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout)


def _write(tmp_path, data, name="run.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"num_generation": 4}, "num_generation"),
        ({"learning_rate": "fast"}, "learning_rate"),
        ({"num_generations": 1}, "num_generations"),
        ({"generation_batch_size": 30, "num_generations": 8}, "generation_batch_size"),
        ({"model": "/definitely/not/here"}, "model"),
        ({"train_file": "MISSING_COLUMN"}, "train_file"),
        ({"task": "nope"}, "task"),
    ],
)
def test_bad_config_is_one_line_exit_2(tmp_path, data, needle):
    if data.get("train_file") == "MISSING_COLUMN":
        bad = tmp_path / "rows.jsonl"
        bad.write_text('{"prompt": "1+1=", "solution": "2"}\n')
        data = {**FAST, "train_file": str(bad), "sft_steps": 0}
    res = run_cli("train", _write(tmp_path, data), "--output-dir", tmp_path / "out", "--no-progress")
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert needle in lines[0] and "Traceback" not in res.stderr


def test_missing_config_file_and_bad_flag(tmp_path):
    res = run_cli("train", tmp_path / "nope.yaml")
    assert res.returncode == 2 and "does not exist" in res.stderr
    res = run_cli("train", "--max-steps", "many")
    assert res.returncode == 2 and "Traceback" not in res.stderr


def test_train_then_eval(tmp_path):
    cfg = _write(tmp_path, {**FAST, "max_steps": 2})
    res = run_cli("train", cfg, "--output-dir", tmp_path / "run", "--no-progress")
    assert res.returncode == 0, res.stderr
    assert "RL gain" in res.stdout
    res = run_cli("eval", tmp_path / "run" / "final", "--task", "addition", "--k", "3", "--n", "10")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert 0.0 <= out["accuracy"] <= out["pass@3"] + 1e-9 <= 1.0 + 1e-9
    assert out["n"] == 10 and out["mean_length"] > 0
    res = run_cli("eval", tmp_path / "nowhere")
    assert res.returncode == 2 and "config.json" in res.stderr
