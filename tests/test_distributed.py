"""Multi-process training with accelerate: 2 CPU processes (gloo) launched by torchrun.

What is checked: a 2-process update equals a 1-process update on the same global batch (every loss
aggregation); a 2-process run writes every metrics step once, its ranks hold identical weights after
training, it resumes from its checkpoint to the same numbers as a straight run, and its learning curve
tracks a 1-process run with the same global batch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from critique_rl.config import TrainConfig
from critique_rl.errors import ConfigError
from critique_rl.train import distributed as dist
from critique_rl.train.metrics import read_jsonl

WORKER = str(Path(__file__).with_name("dist_worker.py"))
ACCELERATE_CONFIG = str(Path(__file__).parents[1] / "examples" / "accelerate" / "cpu_2proc.yaml")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], nproc: int, timeout: int = 420) -> subprocess.CompletedProcess:
    """Run the worker as ``nproc`` processes with the documented launcher (``accelerate launch`` and
    examples/accelerate/cpu_2proc.yaml), or as a plain process when ``nproc`` is 1."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if nproc > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", ACCELERATE_CONFIG,
               "--num_processes", str(nproc), "--main_process_port", str(_free_port()), WORKER, *args]
    else:
        cmd = [sys.executable, WORKER, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode and "address already in use" in proc.stderr.lower() and nproc > 1:  # port race: once more
        cmd[cmd.index("--main_process_port") + 1] = str(_free_port())
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


# ---- pure helpers ------------------------------------------------------------------------------------------

def test_shard_is_contiguous_and_whole():
    items = list(range(8))
    assert dist.shard(items, 0, 2) == [0, 1, 2, 3] and dist.shard(items, 1, 2) == [4, 5, 6, 7]
    with pytest.raises(ValueError):
        dist.shard(items, 0, 3)


def test_merge_metrics_sums_counts_and_averages_rates():
    a = {"step": 3, "critique/refinements": 4, "critique/refine_success_rate": 0.5, "loss/total": 1.0,
         "critic/requests": 10, "critic/latency_p50": 0.2, "memory/size": 7.0}
    b = {"step": 3, "critique/refinements": 12, "critique/refine_success_rate": 0.25, "loss/total": 3.0,
         "critic/requests": 6, "critic/latency_p50": 0.4}
    m = dist.merge_metrics([a, b])
    assert m["step"] == 3 and m["critique/refinements"] == 16 and m["critic/requests"] == 16
    assert m["critique/refine_success_rate"] == pytest.approx((0.5 * 4 + 0.25 * 12) / 16)
    assert m["loss/total"] == pytest.approx(2.0) and m["critic/latency_p50"] == pytest.approx(0.3)
    assert m["memory/size"] == 7.0  # only the main process reports memory


def test_merge_metrics_weights_verdict_accuracy_by_the_verdicts_checked():
    a = {"critique/verdicts_checked": 1, "critique/verdict_accuracy": 0.0}
    b = {"critique/verdicts_checked": 3, "critique/verdict_accuracy": 1.0}
    m = dist.merge_metrics([a, b])
    assert m["critique/verdicts_checked"] == 4 and m["critique/verdict_accuracy"] == pytest.approx(0.75)


def test_batch_sizes_are_validated_against_the_process_count():
    dist.validate_world(32, 4, 8, 2)  # 8 prompts -> 4 per process, 16 completions per process
    with pytest.raises(ConfigError, match="generation_batch_size.*3 processes"):
        dist.validate_world(32, 4, 8, 3)
    with pytest.raises(ConfigError, match="mini_batch_size"):
        dist.validate_world(32, 4, 32, 2)


# ---- real processes ----------------------------------------------------------------------------------------

def test_two_process_update_equals_one_process_update(tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    launch(["update", str(one)], 1)
    launch(["update", str(two)], 2)
    r1, r2 = json.loads(one.read_text()), json.loads(two.read_text())
    assert r2["world"] == 2
    for agg in ("token_sum_norm", "token_mean", "seq_mean_token_mean"):
        ref = r1["ranks"][0][agg]["checksum"]
        for rank in r2["ranks"]:  # every rank holds the same weights, equal to the 1-process step
            assert rank[agg]["checksum"] == pytest.approx(ref, rel=1e-5, abs=1e-5), agg
        mean_loss = sum(rank[agg]["loss"] for rank in r2["ranks"]) / 2
        assert mean_loss == pytest.approx(r1["ranks"][0][agg]["loss"], rel=1e-5, abs=1e-7), agg


def _config(tmp_path: Path, name: str, **kw) -> Path:
    base = dict(tiny_hidden_size=64, tiny_heads=2, tiny_layers=1, sft_steps=60, sft_batch_size=32,
                sft_examples=300, sft_learning_rate=3e-3, max_steps=4, num_generations=4, generation_batch_size=16,
                mini_batch_size=4, eval_n=20, eval_batch_size=20, checkpoint_every=2, progress=False,
                log_rollouts=2, output_dir=str(tmp_path / name), critique_on="all_wrong_groups",
                critic={"backend": "rule", "kind": "ground_truth"}, memory={"enabled": True, "embeddings": "lexical"},
                learning_rate=3e-4)
    base.update(kw)
    TrainConfig(**{k: v for k, v in base.items() if k not in ("critic", "memory")})  # validates early
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(base))
    return path


def _ranks(out_json: Path, world: int) -> list[dict]:
    return [json.loads(Path(f"{out_json}.rank{r}").read_text()) for r in range(world)]


def test_two_processes_train_write_once_agree_and_resume(tmp_path):
    straight = _config(tmp_path, "straight")
    launch(["train", str(straight), str(tmp_path / "s.json")], 2)
    ranks = _ranks(tmp_path / "s.json", 2)
    assert ranks[0]["world"] == 2
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # weights identical across ranks after 4 steps
    assert ranks[0]["summary"] == ranks[1]["summary"] and ranks[0]["summary"]["num_processes"] == 2
    out = tmp_path / "straight"
    rows = read_jsonl(out / "metrics.jsonl")
    rl = [r["step"] for r in rows if "loss/total" in r]
    assert rl == [1, 2, 3, 4]  # every step written once, by one process
    assert sum(1 for r in rows if r.get("final")) == 1
    first = next(r for r in rows if "loss/total" in r)
    assert first["critique/refinements"] >= 0 and "memory/size" in first
    roll = read_jsonl(out / "rollouts.jsonl")
    assert {r["rank"] for r in roll} == {0, 1}  # both processes' rollouts, written by the main process
    assert (out / "final" / "config.json").is_file() and (out / "summary.json").is_file()
    assert json.loads((out / "summary.json").read_text())["steps"] == 4

    # the same run in two halves: stop after step 2 (checkpoint), then --resume to step 4
    half = _config(tmp_path, "half", max_steps=2)
    launch(["train", str(half), str(tmp_path / "h.json")], 2)
    rest = _config(tmp_path, "half", max_steps=4)
    launch(["train", str(rest), str(tmp_path / "r.json"), "--resume"], 2)
    resumed = [r for r in read_jsonl(tmp_path / "half" / "metrics.jsonl") if "loss/total" in r]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    straight_rows = [r for r in rows if "loss/total" in r]
    for a, b in zip(straight_rows[2:], resumed[2:], strict=True):
        for key in ("loss/total", "train/accuracy", "reward/mean", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["step"], key)
    assert _ranks(tmp_path / "r.json", 2)[0]["checksum"] == pytest.approx(ranks[0]["checksum"], rel=1e-6)
