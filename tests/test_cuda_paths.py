"""What only a CUDA GPU can check (skipped without one; run by scripts/gpu_check.sh): the memory estimate
against the CUDA allocator's peak, and the shared-prefix forward and fused LM head on CUDA kernels."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from critique_rl.config import CriticConfig, TrainConfig
from critique_rl.gpu_memory_step import Target, step_shape, trace_step
from critique_rl.train.batching import completion_logprobs, enable_fused_head, pack
from critique_rl.train.prefix_sharing import set_prefix_sharing

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")


def _config() -> LlamaConfig:
    # ~80M parameters: the step peak (~1.5 GB) dwarfs what the tracer cannot see (cuBLAS workspace, ~32 MiB)
    return LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True,
                       max_position_embeddings=1024)


@pytest.mark.parametrize("target", [Target("cuda", None, False, True), Target("cuda", torch.bfloat16, True, True)],
                         ids=["fp32", "bf16-autocast-fused"])
def test_estimate_within_15_percent_of_the_cuda_allocator_peak(target):
    mc = _config()
    cfg = TrainConfig(model="tiny", num_generations=4, generation_batch_size=32, mini_batch_size=16,
                      max_new_tokens=128, critique_on="none", critic=CriticConfig(backend="none"), device="cuda",
                      mixed_precision="bf16" if target.autocast_dtype else "no")
    shape = step_shape(cfg, prompt_tokens=32)
    est = trace_step(mc, cfg, shape, target, fake=True)
    torch.cuda.empty_cache()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(mc, attn_implementation="sdpa", dtype=torch.float32)
    real = trace_step(mc, cfg, shape, target, fake=False, model=model, device="cuda")
    measured = real["cuda_max_allocated_bytes"]
    assert abs(est["peak_bytes"] - measured) <= 0.15 * measured, (est["peak_bytes"], measured, real["peak_bytes"])


def test_shared_prefix_and_fused_head_match_the_plain_forward_on_cuda():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(), attn_implementation="sdpa", dtype=torch.float32).cuda()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 32000, (n,), generator=g).tolist() for n in (40, 17)]
    rows = [prompts[0]] * 3 + [prompts[1]] * 2
    comps = [torch.randint(3, 32000, (n,), generator=g).tolist() for n in (9, 12, 5, 12, 7)]
    batch = pack(rows, comps, pad_id=0).to(torch.device("cuda"))
    set_prefix_sharing(model, "off")
    plain = completion_logprobs(model, batch, entropy="detached").logp
    set_prefix_sharing(model, "on")
    shared = completion_logprobs(model, batch, entropy="detached").logp
    mask = batch.completion_mask.bool()
    assert torch.allclose(plain[mask], shared[mask], atol=1e-4)
    enable_fused_head(model)
    fused = completion_logprobs(model, batch, entropy="detached").logp
    assert torch.allclose(plain[mask], fused[mask], atol=1e-4)
