"""benchmarks/vs_trl.py's cpu-long-prompt preset: the shape and prompts padded to exactly 256 tokens."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "vs_trl.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("vs_trl_bench_lp", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["vs_trl_bench_lp"] = mod
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("vs_trl_bench_lp", None)


def test_long_prompt_preset_is_cpu_medium_with_256_token_prompts(bench):
    lp, med = bench.PRESETS["cpu-long-prompt"], bench.PRESETS["cpu-medium"]
    shape = ("arch", "layers", "hidden", "heads", "kv_heads", "intermediate", "vocab")
    assert [getattr(lp, k) for k in shape] == [getattr(med, k) for k in shape]
    assert (lp.prompts, lp.num_generations, lp.max_new_tokens, lp.prompt_tokens, lp.device) == (4, 8, 32, 256, "cpu")
    assert med.prompt_tokens is None


def test_long_prompts_have_exactly_256_tokens_and_end_with_the_question(bench, tmp_path):
    from transformers import AutoTokenizer

    preset = bench.PRESETS["cpu-long-prompt"]
    small = bench.replace(preset, layers=1, hidden=64, heads=2, kv_heads=2, intermediate=64)
    bench.build_model(small, tmp_path)
    cfg = (tmp_path / "config.json").read_text()
    assert '"max_position_embeddings": 352' in cfg  # 256 + 32 + 64
    rows = bench.prompt_rows(12, prompt_tokens=256, model_dir=tmp_path)
    bare = bench.prompt_rows(12)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    for r, b in zip(rows, bare, strict=True):
        assert len(tok(r["prompt"], add_special_tokens=False)["input_ids"]) == 256
        assert r["prompt"].endswith("\n" + b["prompt"]) and r["answer"] == b["answer"]
        for line in r["prompt"].strip().split("\n")[:-1]:  # the context's worked additions are right
            lhs, rhs = line.split("=")
            a, c = lhs.split("+")
            assert int(a) + int(c) == int(rhs)
    assert len({r["prompt"] for r in rows}) == 12  # each row its own context
    assert rows == bench.prompt_rows(12, prompt_tokens=256, model_dir=tmp_path)  # same rows for both arms
    with pytest.raises(ValueError, match="model_dir"):
        bench.prompt_rows(2, prompt_tokens=256)
