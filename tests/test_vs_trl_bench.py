"""benchmarks/vs_trl.py without TRL: presets, summaries, the ratio lines, and our arm alone on cpu-tiny."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "vs_trl.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("vs_trl_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["vs_trl_bench"] = mod  # dataclasses look the module up by name
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("vs_trl_bench", None)


def test_presets_match_the_spec(bench):
    tiny, med, gpu = (bench.PRESETS[k] for k in ("cpu-tiny", "cpu-medium", "gpu-0.5b"))
    assert (tiny.arch, tiny.layers, tiny.hidden, tiny.heads, tiny.vocab) == ("llama", 2, 128, 4, 512)
    assert (tiny.prompts, tiny.num_generations, tiny.max_new_tokens, tiny.device) == (4, 8, 8, "cpu")
    assert tiny.hidden // tiny.heads >= 32
    assert (med.arch, med.layers, med.hidden, med.vocab) == ("llama", 6, 512, 2048)
    assert med.heads in (8, 16) and med.hidden // med.heads >= 32
    assert (med.prompts, med.num_generations, med.max_new_tokens, med.device) == (4, 8, 32, "cpu")
    assert (gpu.arch, gpu.layers, gpu.hidden, gpu.intermediate, gpu.heads, gpu.kv_heads, gpu.vocab) == (
        "qwen2", 24, 896, 4864, 14, 2, 151_936)
    assert gpu.tie_embeddings and gpu.device == "cuda"
    assert (gpu.prompts, gpu.num_generations, gpu.max_new_tokens, gpu.micro_batch) == (16, 8, 256, 32)
    for p in bench.PRESETS.values():
        assert p.completions_per_step % p.micro_batch == 0
        assert p.grad_accum * p.micro_batch == p.completions_per_step


def test_summarize_and_run_summary(bench):
    assert bench.summarize([3.0, 1.0, 2.0, None]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert bench.summarize([1.0, 2.0, 3.0, 4.0])["median"] == 2.5
    assert bench.summarize([None]) == {"median": None, "min": None, "max": None, "n": 0}
    out = bench.run_summary([2.0, 4.0, 3.0], [1.0, 1.5, None], completions_per_step=32)
    assert out["median_step_s"] == 3.0
    assert out["median_generate_s"] == 1.25
    assert out["median_rest_s"] == 1.75  # median of the per-step (step - generate): 1.0, 2.5
    assert out["samples_per_s"] == pytest.approx(32 / 3.0)


def test_arm_summary_takes_medians_over_rounds_and_skips_failures(bench):
    runs = [{"median_step_s": s, "median_generate_s": s / 2, "median_rest_s": s / 2, "peak_mem_bytes": m,
             "after_load_mem_bytes": 100, "delta_mem_bytes": m - 100, "timed_peak_mem_bytes": m,
             "mean_completion_length": 8.0, "completions_per_step": 32}
            for s, m in ((1.0, 300), (2.0, 500), (4.0, 400))]
    s = bench.arm_summary([*runs, {"error": "boom"}])
    assert (s["rounds"], s["failed_rounds"]) == (3, 1)
    assert s["median_step_s"] == 2.0 and s["samples_per_s"] == 16.0
    assert s["peak_mem_bytes"] == 400 and s["delta_mem_bytes"] == 300


def test_ratio_lines_format(bench):
    lines = bench.ratio_lines({"samples_per_s": 30.0, "peak_mem_bytes": 600},
                              {"samples_per_s": 20.0, "peak_mem_bytes": 400})
    assert lines == ["samples/s ratio (ours/TRL): 1.500", "memory ratio (ours/TRL): 1.500"]
    pat = re.compile(r"^samples/s ratio \(ours/TRL\): (\S+)$")
    assert float(pat.match(lines[0]).group(1)) == 1.5
    assert bench.ratio_lines({"samples_per_s": None}, {"samples_per_s": 2.0})[0].endswith(": n/a")
    assert bench.safe_ratio(1.0, 0) is None


def test_paired_ratio_pairs_the_runs_of_each_round(bench):
    rows = [{"round": 1, "arm": "ours", "samples_per_s": 10.0}, {"round": 1, "arm": "trl", "samples_per_s": 5.0},
            {"round": 2, "arm": "ours", "samples_per_s": 4.0}, {"round": 2, "arm": "trl", "samples_per_s": 4.0},
            {"round": 3, "arm": "ours", "samples_per_s": 3.0}, {"round": 3, "arm": "trl", "error": "x"}]
    out = bench.paired_ratio(rows, "samples_per_s")
    assert out == {"median": 1.5, "per_round": [2.0, 1.0]}


def test_rounds_table_lists_every_run(bench):
    row = {"round": 1, "arm": "ours", "median_step_s": 0.5, "median_generate_s": 0.2, "median_rest_s": 0.3,
           "samples_per_s": 64.0, "peak_mem_bytes": 2**20 * 300, "after_load_mem_bytes": 2**20 * 250,
           "delta_mem_bytes": 2**20 * 50, "timed_peak_mem_bytes": None, "mean_completion_length": 8.0}
    text = bench.rounds_table([row, {"round": 1, "arm": "trl", "error": "x"}], "RSS")
    assert "64.0" in text and "300.0" in text and "FAILED" in text
    assert len(text.splitlines()) == 4


def test_our_arm_alone_on_cpu_tiny(bench, tmp_path):
    """One warm-up + one timed step of our trainer in a subprocess, as the parent launches it (one torch
    thread: ~7 s here, where two threads on a busy 2-core machine take several times longer)."""
    pytest.importorskip("transformers")
    model_dir = tmp_path / "model"
    info = bench.build_model(bench.PRESETS["cpu-tiny"], model_dir)
    assert info["model_vocab"] == 512 and info["tokenizer_size"] <= 512
    result = tmp_path / "ours.json"
    cmd = [sys.executable, str(BENCH), "--arm", "ours", "--preset", "cpu-tiny", "--model-dir", str(model_dir),
           "--result-file", str(result), "--steps", "1", "--warmup", "1", "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(result.read_text())
    assert r["arm"] == "ours" and r["completions_per_step"] == 32
    assert len(r["step_times_s"]) == 1 and r["median_step_s"] > 0
    assert r["samples_per_s"] == pytest.approx(32 / r["median_step_s"])
    assert 0 < r["median_generate_s"] < r["median_step_s"]
    assert r["mem_kind"] == "rss" and r["peak_mem_bytes"] >= r["after_load_mem_bytes"] > 0
    assert r["versions"]["torch"] and r["torch_threads"] == 1
