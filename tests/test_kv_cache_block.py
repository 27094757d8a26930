"""The block KV cache of HFGenerator (critique_rl/rollout/kv_cache.py) and the one-pass sampled-token log-prob
recorder: the same keys/values as transformers' concatenating DynamicLayer, the same sampled tokens and the
same recorded log-probs (bit for bit, and within 1e-5 of a teacher-forced forward)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, MistralConfig, MistralForCausalLM
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from critique_rl.algos.logprobs import selective_log_softmax
from critique_rl.models import build_tiny_model, build_tiny_tokenizer
from critique_rl.rollout import hf as hf_module
from critique_rl.rollout.base import SamplingParams
from critique_rl.rollout.hf import HFGenerator, SampledLogprobRecorder, prefill_shared_prompts
from critique_rl.rollout.kv_cache import BlockKVLayer, block_cache, gather_rows
from critique_rl.train.batching import completion_logprobs, pack
from critique_rl.train.prefix_sharing import set_prefix_sharing

ATOL = 1e-5


@pytest.fixture(scope="module")
def tok():
    texts = ["12+34=46", "7+8=15", "What is 100+1? Answer: 101", "rev:abc=cba"] * 20
    return build_tiny_tokenizer(texts, vocab_size=300)


def _kv(g: torch.Generator, B: int, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(B, 2, L, 8, generator=g), torch.randn(B, 2, L, 4, generator=g)


# ---- the layer on its own ---------------------------------------------------------------------------------

@pytest.mark.parametrize("hint,block", [(0, 1), (5, 2), (9, 256), (3, 3)])
def test_block_layer_returns_what_the_concatenating_layer_returns(hint, block):
    """Prefill of 3 positions, then 6 one-position steps: each update returns the same keys/values as
    DynamicLayer's torch.cat, across buffer growth (hint below / at / above the need, tiny blocks)."""
    g = torch.Generator().manual_seed(0)
    ref, blk = DynamicLayer(), BlockKVLayer(capacity_hint=hint, block=block)
    for n in (3, 1, 1, 1, 1, 1, 1):
        k, v = _kv(g, 2, n)
        rk, rv = ref.update(k, v)
        bk, bv = blk.update(k, v)
        assert torch.equal(bk, rk) and torch.equal(bv, rv)
        assert blk.get_seq_length() == ref.get_seq_length() == rk.shape[-2]
    assert blk._kbuf is not None and blk._kbuf.shape[-2] >= 9


def test_block_layer_reserves_at_most_a_block_ahead_and_grows_by_blocks():
    layer = BlockKVLayer(capacity_hint=1000, block=4)
    g = torch.Generator().manual_seed(1)
    layer.update(*_kv(g, 1, 5))
    assert layer._kbuf.shape[-2] == 9  # 5 + one block, not the 1000 hinted
    for _ in range(4):
        layer.update(*_kv(g, 1, 1))
    assert layer._kbuf.shape[-2] == 9
    layer.update(*_kv(g, 1, 1))  # the 10th position: one regrowth
    assert layer._kbuf.shape[-2] == 14 and layer.get_seq_length() == 10
    short = BlockKVLayer(capacity_hint=7, block=256)
    short.update(*_kv(g, 1, 5))
    assert short._kbuf.shape[-2] == 7  # never beyond the hint while within it


def test_block_layer_row_operations_and_crop_match_the_dynamic_layer():
    g = torch.Generator().manual_seed(2)
    ref, blk = DynamicLayer(), BlockKVLayer(capacity_hint=12, block=4)
    for n in (4, 1, 1):
        k, v = _kv(g, 3, n)
        ref.update(k, v)
        blk.update(k, v)
    idx = torch.tensor([2, 0, 0, 1])
    ref.batch_select_indices(idx)
    blk.batch_select_indices(idx)
    ref.batch_repeat_interleave(2)
    blk.batch_repeat_interleave(2)
    beam = torch.arange(8).flip(0)
    ref.reorder_cache(beam)
    blk.reorder_cache(beam)
    ref.crop(-2)
    blk.crop(-2)
    assert torch.equal(blk.keys, ref.keys) and torch.equal(blk.values, ref.values)
    k, v = _kv(g, 8, 1)
    rk, _ = ref.update(k, v)
    bk, _ = blk.update(k, v)
    assert torch.equal(bk, rk) and blk.get_seq_length() == 5
    with pytest.raises(ValueError, match="rows"):
        blk.update(*_kv(g, 3, 1))
    with pytest.raises(ValueError, match="block"):
        BlockKVLayer(block=0)


def test_block_cache_keeps_sliding_window_layers_and_refuses_models_without_plain_layers(tok):
    llama = build_tiny_model(tok, hidden_size=64, layers=2, heads=2)
    cache = block_cache(llama, capacity_hint=20)
    assert isinstance(cache, DynamicCache) and all(isinstance(x, BlockKVLayer) for x in cache.layers)
    mistral = MistralForCausalLM(MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                               sliding_window=4))
    assert all(type(x) is DynamicSlidingWindowLayer for x in DynamicCache(config=mistral.config).layers)
    assert block_cache(mistral, capacity_hint=20) is None  # nothing to replace: generate builds its own


def test_gather_rows_copies_the_prefilled_rows_into_block_layers(tok):
    model = build_tiny_model(tok, hidden_size=64, layers=2, heads=2, seed=0).eval()
    ids = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11], [0, 5, 6, 7]])
    attn = (torch.arange(4)[None, :] >= torch.tensor([[1], [0], [1]])).long()
    plain = prefill_shared_prompts(model, ids, attn)
    into = prefill_shared_prompts(model, ids, attn, into=block_cache(model, capacity_hint=10))
    assert into is not None and into.get_seq_length() == plain.get_seq_length() == 3
    for a, b in zip(into.layers, plain.layers, strict=True):
        assert isinstance(a, BlockKVLayer)
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    with pytest.raises(ValueError, match="layers"):
        gather_rows(block_cache(build_tiny_model(tok, hidden_size=64, layers=1, heads=2), 10), plain,
                    torch.tensor([0]))


# ---- generation -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sharing", ["off", "on"])
@pytest.mark.parametrize("block", [256, 2])
def test_generation_with_the_block_cache_samples_the_same_tokens_and_logprobs(tok, sharing, block, monkeypatch):
    """Fixed seed, left-padded prompts of different lengths, temperature and top-p: the block cache (one
    allocation, or a regrowth every 2 positions) gives the tokens and log-probs of generate's own cache."""
    model = build_tiny_model(tok, hidden_size=64, layers=2, heads=2, seed=0)
    set_prefix_sharing(model, sharing)
    monkeypatch.setattr(hf_module, "DEFAULT_BLOCK", block)
    prompts = ["12+34=", "What is 100+1? Answer:", "7+8="]
    params = SamplingParams(n=3, temperature=0.8, top_p=0.9, max_new_tokens=9)
    out = {}
    for kv in ("dynamic", "block"):
        torch.manual_seed(5)
        out[kv] = [c for g in HFGenerator(model, tok, batch_size=16, kv_cache=kv).generate(prompts, params) for c in g]
    assert any(len(c.token_ids) > 3 for c in out["block"])
    for a, b in zip(out["dynamic"], out["block"], strict=True):
        assert a.token_ids == b.token_ids
        assert a.logprobs == b.logprobs  # bit for bit


def test_generator_passes_a_block_cache_unless_told_otherwise(tok, monkeypatch):
    model = build_tiny_model(tok, hidden_size=64, layers=1, heads=2, seed=0)
    set_prefix_sharing(model, "off")
    seen: list = []
    real = model.generate

    def spy(*args, **kwargs):
        seen.append(kwargs.get("cache", kwargs.get("past_key_values")))
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    params = SamplingParams(n=2, max_new_tokens=3)
    HFGenerator(model, tok).generate(["1+2="], params)
    HFGenerator(model, tok, kv_cache="dynamic").generate(["1+2="], params)
    model.generation_config.cache_implementation = "dynamic"  # the user's choice wins
    HFGenerator(model, tok).generate(["1+2="], params)
    assert isinstance(seen[0], DynamicCache) and isinstance(seen[0].layers[0], BlockKVLayer)
    assert seen[1] is None and seen[2] is None
    with pytest.raises(ValueError, match="kv_cache"):
        HFGenerator(model, tok, kv_cache="static")


# ---- the recorder -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
@pytest.mark.parametrize("B,V", [(1, 300), (32, 2048), (5, 151)])
def test_recorder_equals_selective_log_softmax_bit_for_bit(temperature, B, V):
    """The one-pass recorder (logsumexp at the step, gather at the next) records exactly the float32 numbers
    of selective_log_softmax on a copy of the step's scores (the recorder before this change)."""
    g = torch.Generator().manual_seed(B * V)
    scores = torch.randn(3, B, V, generator=g) * 4
    toks = torch.randint(V, (B, 3), generator=g)
    rec = SampledLogprobRecorder(temperature)
    ids = torch.zeros(B, 2, dtype=torch.long)
    for t in range(3):
        s = scores[t].clone()
        assert rec(ids, s) is s and torch.equal(s, scores[t])  # scores passed on untouched
        ids = torch.cat([ids, toks[:, t : t + 1]], 1)
    lp = rec.finish(ids[:, 2:])
    ref = torch.stack([selective_log_softmax(scores[t].clone(), toks[:, t], temperature=temperature)
                       for t in range(3)], 1)
    assert lp.dtype == torch.float32 and torch.equal(lp, ref)
    with pytest.raises(ValueError, match="temperature"):
        SampledLogprobRecorder(0.0)


@pytest.mark.parametrize("kv", ["block", "dynamic"])
def test_recorded_logprobs_match_a_teacher_forced_forward_under_temperature_and_top_p(tok, kv):
    """Warpers after the recorder (temperature, top-p) do not change what it recorded: log softmax of
    logits / tau at the sampled tokens, within 1e-5 of a fresh forward on the packed batch."""
    model = build_tiny_model(tok, hidden_size=64, layers=2, heads=2, seed=1)
    prompts = ["12+34=", "What is 100+1? Answer:"]
    tau = 0.7
    params = SamplingParams(n=3, temperature=tau, top_p=0.8, max_new_tokens=8)
    torch.manual_seed(2)
    gen = HFGenerator(model, tok, kv_cache=kv)
    flat = [c for g in gen.generate(prompts, params) for c in g]
    batch = pack([tok(p, add_special_tokens=False)["input_ids"] for p in prompts for _ in range(3)],
                 [c.token_ids for c in flat], tok.pad_token_id)
    with torch.no_grad():
        lp = completion_logprobs(model, batch, tau).logp
    for i, c in enumerate(flat):
        torch.testing.assert_close(lp[i, : len(c.token_ids)], torch.tensor(c.logprobs), rtol=0, atol=ATOL)

