"""GPU memory without a GPU: the live-tensor tracer, the fake-tensor trace of the trainer's update step against
the same step on real tensors (tiny model), and `critique-rl estimate-memory`."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from typer.testing import CliRunner

from critique_rl.config import CriticConfig, TrainConfig
from critique_rl.errors import UserError
from critique_rl.gpu_memory import LiveTensorTracker, rounded
from critique_rl.gpu_memory_estimate import estimate_memory, generation_parts
from critique_rl.gpu_memory_step import Target, step_shape, trace_step


def tiny_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True,
                       max_position_embeddings=256)


def train_cfg(**kw) -> TrainConfig:
    base = dict(model="tiny", num_generations=4, generation_batch_size=16, mini_batch_size=8, max_new_tokens=8,
                critique_on="none", critic=CriticConfig(backend="none"), device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def test_tracker_counts_live_bytes_rounded_to_blocks_and_keeps_the_peak():
    tr = LiveTensorTracker()
    with tr:
        a = torch.ones(1000)  # 4000 B -> 4096
        b = torch.ones(100)  # 400 B -> 512
        assert tr.current == 4096 + 512
        c = a * 2  # another 4096
        v = c[10:]  # a view: same storage, no new bytes
        assert tr.current == 2 * 4096 + 512
        del a, c
        assert tr.current == 4096 + 512  # c is still alive through the view
        del v
        assert tr.current == 512
        d = torch.ones(10, dtype=torch.float64)  # 80 B -> 512
    assert tr.peak == 2 * 4096 + 512
    assert tr.current == 1024
    assert rounded(0) == 0 and rounded(1) == 512 and rounded(513) == 1024
    del b, d


def test_tracker_phases_and_gradients_by_category():
    lin = torch.nn.Linear(64, 64, bias=False)
    tr = LiveTensorTracker()
    tr.register(list(lin.parameters()), "weights")
    hooks = tr.watch_gradients(lin.parameters())
    with tr:
        with tr.phase("activations"):
            y = lin(torch.ones(32, 64))
        with tr.phase("backward temporaries"):
            y.sum().backward()
    for h in hooks:
        h.remove()
    assert tr.by_category["weights"] == 64 * 64 * 4
    assert tr.by_category["gradients"] == 64 * 64 * 4  # moved there when autograd stored .grad
    assert tr.peak_parts["weights"] == 64 * 64 * 4


@pytest.mark.parametrize("target", [Target("cpu", None, False, False), Target("cuda", torch.bfloat16, True, True)],
                         ids=["fp32-cpu", "bf16-autocast-fused-foreach"])
def test_fake_trace_of_the_update_matches_the_real_step_within_10_percent(target):
    mc = tiny_config()
    cfg = train_cfg()
    shape = step_shape(cfg, prompt_tokens=12)
    est = trace_step(mc, cfg, shape, target, fake=True)
    torch.manual_seed(0)
    real = AutoModelForCausalLM.from_config(mc, attn_implementation="sdpa")
    meas = trace_step(mc, cfg, shape, target, fake=False, model=real)
    assert meas["peak_bytes"] > 0
    assert abs(est["peak_bytes"] - meas["peak_bytes"]) <= 0.10 * meas["peak_bytes"]
    w = sum(p.numel() for p in real.parameters()) * 4
    for parts in (est["peak_parts"], meas["peak_parts"]):
        assert parts["weights"] >= w  # parameters (+ buffers)
        assert parts["optimizer state"] >= 2 * w  # AdamW: exp_avg + exp_avg_sq
        assert parts.get("activations", 0) > 0


def test_trace_grows_with_completion_length_and_checkpointing_shrinks_activations():
    mc, target = tiny_config(), Target("cpu", None, False, False)
    short = trace_step(mc, train_cfg(), step_shape(train_cfg(), 12, 8), target)
    long = trace_step(mc, train_cfg(), step_shape(train_cfg(), 12, 64), target)
    ckpt = trace_step(mc, train_cfg(gradient_checkpointing=True), step_shape(train_cfg(), 12, 64), target)
    assert long["peak_parts"]["activations"] > 4 * short["peak_parts"]["activations"]
    assert ckpt["peak_parts"].get("activations", 0) < long["peak_parts"]["activations"] / 2


def test_generation_kv_cache_from_shape():
    mc = tiny_config()
    cfg = train_cfg(mixed_precision="bf16")
    shape = step_shape(cfg, 12, 8)
    parts = generation_parts(mc, cfg, shape, Target(), weight_bytes=1000)
    # 2 (K, V) x 2 layers x 2 kv heads x 32 head_dim x 16 rows x 20 positions x 2 bytes (bf16)
    assert parts["KV cache"] == 2 * 2 * 2 * 32 * 16 * 20 * 2
    assert parts["decode buffers"] == 16 * 512 * 4 * 4
    assert parts["autocast weight copies"] == 500
    # past one 256-position block the cache holds whole blocks: 300 new tokens -> 512 positions after the prompt
    longer = generation_parts(mc, cfg, step_shape(cfg, 12, 300), Target(), weight_bytes=1000)
    assert longer["KV cache"] == 2 * 2 * 2 * 32 * 16 * (12 + 512) * 2


def test_estimate_needs_a_local_config_json(tmp_path):
    with pytest.raises(UserError, match="config.json"):
        estimate_memory(train_cfg(model=str(tmp_path)), gpu_gb=1)


def test_cli_says_whether_it_fits_and_what_to_change(tmp_path):
    from critique_rl.cli import app

    (tmp_path / "model").mkdir()
    tiny_config().save_pretrained(tmp_path / "model")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {tmp_path / 'model'}\ntask: addition\nnum_generations: 4\ngeneration_batch_size: 16\n"
                   "mini_batch_size: 16\nmax_new_tokens: 64\ncritique_on: none\ncritic: {backend: none}\n")
    runner = CliRunner()
    big = runner.invoke(app, ["estimate-memory", str(cfg), "--gpu-gb", "80", "--prompt-tokens", "16", "--json"])
    assert big.exit_code == 0, big.output
    out = json.loads(big.output[big.output.index("{"):])
    assert out["fits"] and not out["advice"]
    need = out["peak_gb"]
    assert out["update_parts_gb"]["activations"] > 0 and out["generation_parts_gb"]["KV cache"] > 0
    # a GPU just below the estimate: not fitting, and a change that fits is named
    small = runner.invoke(app, ["estimate-memory", str(cfg), "--gpu-gb", str(need * 0.9), "--prompt-tokens", "16"])
    assert small.exit_code == 0, small.output
    assert "does NOT fit" in small.output
    assert "change: " in small.output


def test_kv_positions_follow_the_block_cache_growth():
    from critique_rl.gpu_memory_estimate import _kv_positions
    from critique_rl.rollout.kv_cache import DEFAULT_BLOCK

    assert DEFAULT_BLOCK == 256  # the estimator's block; change both together
    assert [_kv_positions(t) for t in (8, 256, 257, 512, 2048, 2049)] == [8, 256, 512, 512, 2048, 2304]
