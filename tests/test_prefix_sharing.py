"""Shared-prefix forward (Prefix Grouper, arXiv:2506.05433): each group's prompt encoded once, with the same
per-token log-probs, entropies and parameter gradients as the unshared forward (<= 1e-5), in scoring, in a
whole policy update, and in generation (prefill once, KV cache copied to the samples)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from critique_rl.agents.guess import GuessNumberEnv, make_tasks
from critique_rl.agents.runner import EpisodeLimits, run_episodes
from critique_rl.agents.trajectory import TINY_CHAT_TEMPLATE, TurnRenderer
from critique_rl.models import build_tiny_model, build_tiny_tokenizer, format_prompt
from critique_rl.rollout.base import SamplingParams
from critique_rl.rollout.hf import HFGenerator, prefill_shared_prompts
from critique_rl.train.batching import completion_logprobs, enable_fused_head, pack
from critique_rl.train.prefix_sharing import (
    block_attention_mask,
    forward_costs,
    plan_groups,
    prefix_sharing_mode,
    set_prefix_sharing,
    shared_plan,
)

ATOL = 1e-5


def _model(arch: str, impl: str, vocab: int = 120, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, attn_implementation=impl)
        return LlamaForCausalLM(cfg)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation=impl)
    return Qwen2ForCausalLM(cfg)


@pytest.fixture(scope="module")
def tok():
    texts = ["U: Guess my number from 1 to 16.\nA: 4<|eos|>\nU: Higher. It is from 5 to 16.\nA: 8<|eos|>\n"] * 30
    texts += ["12+34=46", "7+8=15", "What is 100+1? Answer: 101", "S: Guess the middle of the range."] * 10
    t = build_tiny_tokenizer(texts, vocab_size=300)
    t.chat_template = TINY_CHAT_TEMPLATE
    return t


def _rows(seed: int = 1, vocab: int = 120):
    """Two prompts of different lengths (left padding differs), groups of 3 and 2, plus a refinement-like row
    of group A appended at the end (not adjacent to its group); completions of different lengths."""
    g = torch.Generator().manual_seed(seed)

    def rnd(n):
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    pa, pb = rnd(11), rnd(4)
    prompts = [pa, pa, pa, pb, pb, pa]
    comps = [rnd(5), rnd(1), rnd(7), rnd(3), rnd(6), rnd(4)]
    return prompts, comps


def _compare(plain, shared, batch, *, keep_logits=False, with_grad=True):
    """Scores and every parameter's gradient of ``plain`` (mode off) and ``shared`` (mode on) on ``batch``."""
    set_prefix_sharing(plain, "off")
    set_prefix_sharing(shared, "on")
    assert shared_plan(shared, batch) is not None and shared_plan(plain, batch) is None
    m = batch.completion_mask.float()
    a = completion_logprobs(plain, batch, 0.7, entropy="grad", keep_logits=keep_logits)
    b = completion_logprobs(shared, batch, 0.7, entropy="grad", keep_logits=keep_logits)
    assert torch.isfinite(b.logp).all() and torch.isfinite(b.entropy).all()
    torch.testing.assert_close(b.logp * m, a.logp * m, rtol=0, atol=ATOL)
    torch.testing.assert_close(b.entropy * m, a.entropy * m, rtol=0, atol=ATOL)
    if keep_logits:
        torch.testing.assert_close(b.logits * m[..., None], a.logits * m[..., None], rtol=0, atol=ATOL)
    if not with_grad:
        return
    w = torch.linspace(-1.0, 1.5, m.numel()).view_as(m)
    ((a.logp * w + 0.3 * a.entropy) * m).sum().backward()
    ((b.logp * w + 0.3 * b.entropy) * m).sum().backward()
    n = 0
    for (name, p), q in zip(plain.named_parameters(), shared.parameters(), strict=True):
        if not p.requires_grad:  # frozen (LoRA base weights)
            assert p.grad is None and q.grad is None, name
            continue
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=ATOL, msg=name)
        n += int(p.grad.abs().sum() > 0)
    assert n > 0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("head", ["logits", "fused"])
def test_packed_forward_equals_unshared_values_and_every_gradient(arch, impl, head):
    prompts, comps = _rows()
    batch = pack(prompts, comps, pad_id=0)
    plain = _model(arch, impl)
    shared = copy.deepcopy(plain)
    if head == "fused":
        enable_fused_head(plain)
        enable_fused_head(shared)
    _compare(plain, shared, batch)


def test_keep_logits_and_gradient_checkpointing():
    prompts, comps = _rows(seed=3)
    batch = pack(prompts, comps, pad_id=0)
    plain = _model("llama", "sdpa")
    shared = copy.deepcopy(plain)
    for m in (plain, shared):
        (getattr(m, "activation_checkpointing_enable", None) or m.gradient_checkpointing_enable)()
        m.train()
    _compare(plain, shared, batch, keep_logits=True)


def test_chat_template_prompts_of_different_lengths(tok):
    model = build_tiny_model(tok, hidden_size=64, layers=2, heads=2, seed=0)
    texts = ["What is 100+1?", "12+34=", "Guess my number from 1 to 16, then say it twice."]
    prompts = [tok(format_prompt(tok, t, True, system="Answer briefly."), add_special_tokens=False)["input_ids"]
               for t in texts]
    assert len({len(p) for p in prompts}) == 3
    g = torch.Generator().manual_seed(0)
    rows = [prompts[i] for i in (0, 0, 1, 1, 1, 2, 2, 0)]
    comps = [torch.randint(3, len(tok), (int(k),), generator=g).tolist() for k in (3, 6, 2, 5, 4, 1, 7, 3)]
    batch = pack(rows, comps, tok.pad_token_id)
    assert plan_groups(batch).groups == 3
    _compare(model, copy.deepcopy(model), batch)


def test_multi_turn_episodes_share_the_context_before_the_first_action(tok):
    """Real episodes (chat template, a memory context in the system message): the shared part is the first
    prompt; completions interleave actions and observations, and only action tokens carry the loss."""
    model = build_tiny_model(tok, hidden_size=64, layers=2, heads=2, seed=1)
    gen = HFGenerator(model, tok, batch_size=16)
    tasks = make_tasks("train", 2, seed=0)
    torch.manual_seed(0)
    trajs = run_episodes(gen, TurnRenderer(tok, True), lambda: GuessNumberEnv(max_guesses=3), tasks, n=3,
                         contexts=["Lesson: halve the range.", None],
                         limits=EpisodeLimits(max_turns=3, max_new_tokens=4))
    assert any(t.num_turns > 1 for t in trajs)
    batch = pack([t.prompt_ids for t in trajs], [t.completion_ids() for t in trajs], tok.pad_token_id)
    action = torch.zeros_like(batch.completion_mask)
    for r, t in enumerate(trajs):
        action[r, : len(t.action_mask())] = torch.tensor(t.action_mask())
    batch.completion_mask = batch.completion_mask * action
    assert plan_groups(batch).groups == 2
    _compare(model, copy.deepcopy(model), batch)


def test_groups_plan_and_block_mask():
    batch = pack([[5, 6, 7], [8, 9], [5, 6, 7]], [[1, 2], [3], [4, 4, 4]], pad_id=0)
    p = plan_groups(batch)
    assert p.groups == 2 and p.input_ids.shape == (2, 8)
    assert p.input_ids[0].tolist() == [5, 6, 7, 1, 2, 4, 4, 4]
    assert p.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5]
    assert p.segments[1].tolist() == [0, 0, 1, -1, -1, -1, -1, -1]
    # row 0 reads the prefix end (2) then its own token; row 2 the prefix end then its tokens at 5, 6
    assert p.gather[0].tolist() == [2, 3, 2] and p.gather[2].tolist() == [2, 5, 6]
    assert p.gather[1].tolist() == [8 + 1, 9, 9]
    m = block_attention_mask(p.segments)[0, 0]
    assert m[5].tolist() == [True, True, True, False, False, True, False, False]  # c2 sees prefix + itself
    assert m[4].tolist() == [True, True, True, True, True, False, False, False]
    pad = block_attention_mask(p.segments)[1, 0, 5]
    assert pad.tolist() == [False] * 5 + [True, False, False]  # padding attends to itself only
    add = block_attention_mask(p.segments, torch.float32)[0, 0]
    assert add[5, 3] == torch.finfo(torch.float32).min and add[5, 0] == 0


def test_auto_shares_long_prompts_and_not_short_prompts_with_long_completions():
    model = _model("llama", "sdpa")
    assert prefix_sharing_mode(model) == "auto"
    long_prompt = pack([list(range(3, 100))] * 8, [[5] * 8] * 8, pad_id=0)
    assert shared_plan(model, long_prompt) is not None
    plain, shared = forward_costs(model, long_prompt, plan_groups(long_prompt))
    assert shared < plain / 3
    # 2-token prompt, 8 x 60-token completions: the packed 482-long sequence's dense attention costs more
    short = pack([[3, 4]] * 8, [[5] * 60] * 8, pad_id=0)
    plain, shared = forward_costs(model, short, plan_groups(short))
    assert shared > plain and shared_plan(model, short) is None
    set_prefix_sharing(model, "on")
    assert shared_plan(model, short) is not None
    set_prefix_sharing(model, "off")
    assert shared_plan(model, long_prompt) is None


def test_on_refuses_what_it_cannot_share():
    model = _model("llama", "sdpa")
    model.config._attn_implementation = "flash_attention_2"  # not run: only the mode check reads it
    with pytest.raises(ValueError, match="takes no custom attention mask"):
        set_prefix_sharing(model, "on")
    with pytest.raises(ValueError, match="prefix_sharing must be one of"):
        set_prefix_sharing(model, "yes")
    set_prefix_sharing(model, "auto")
    assert shared_plan(model, pack([[3, 4]] * 2, [[5]] * 2, pad_id=0)) is None  # auto: plain forward
    model.config._attn_implementation = "sdpa"
    set_prefix_sharing(model, "on")
    holey = pack([[3, 4], [3, 4]], [[5], [6]], pad_id=0)
    holey.attention_mask[0, -2] = 0  # a hole: not pack's layout
    with pytest.raises(ValueError, match="not left-padded prompts"):
        shared_plan(model, holey)


def test_a_deep_copy_of_a_patched_model_scores_with_its_own_weights():
    prompts, comps = _rows()
    batch = pack(prompts, comps, pad_id=0)
    model = _model("llama", "sdpa")
    completion_logprobs(model, batch)  # installs the patched forward on ``model``
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(1.5)
    fresh = copy.deepcopy(twin)
    set_prefix_sharing(fresh, "off")
    m = batch.completion_mask.float()
    torch.testing.assert_close(completion_logprobs(twin, batch).logp * m, completion_logprobs(fresh, batch).logp * m,
                               rtol=0, atol=ATOL)


def test_one_policy_update_is_the_same_with_and_without_sharing(tok):
    """Through ``policy_update`` (micro-batches of 6 split the groups of 4; refinement rows at the end)."""
    from accelerate import Accelerator

    from critique_rl.config import TrainConfig
    from critique_rl.train.update import UpdateBatch, policy_update

    g = torch.Generator().manual_seed(0)
    ps = [torch.randint(3, len(tok), (int(k),), generator=g).tolist() for k in (9, 14, 6)]
    prompts = [p for p in ps for _ in range(4)] + [ps[0], ps[2]]
    comps = [torch.randint(3, len(tok), (int(k),), generator=g).tolist() for k in torch.randint(1, 9, (14,), generator=g)]
    tokens = pack(prompts, comps, tok.pad_token_id)
    off = torch.zeros(14, dtype=torch.bool)
    off[12:] = True
    cfg = TrainConfig(mini_batch_size=6, generation_batch_size=12, num_generations=4, entropy_coef=0.01,
                      max_grad_norm=1e9)
    adv = torch.linspace(-1.0, 2.0, 14).unsqueeze(-1).expand(-1, tokens.completion_len).clone()

    def run(mode):
        model = build_tiny_model(tok, hidden_size=64, layers=2, heads=2, seed=0)
        set_prefix_sharing(model, mode)
        acc = Accelerator(cpu=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        model, opt, sched = acc.prepare(model, opt, sched)
        stats = policy_update(model, opt, sched, acc, UpdateBatch(tokens=tokens, advantages=adv, offpolicy=off),
                              cfg, norm_constant=8.0)
        return stats, [p.detach().clone() for p in model.parameters()]

    s_off, w_off = run("off")
    s_on, w_on = run("on")
    for k in ("loss/total", "loss/policy", "loss/offpolicy", "entropy", "grad_norm"):
        assert s_on[k] == pytest.approx(s_off[k], rel=1e-5, abs=1e-6), k
    for a, b in zip(w_off, w_on, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=ATOL)


# ---- generation -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch_size", [6, 64])
def test_generation_prefills_each_prompt_once_with_the_same_samples(tok, batch_size):
    """Fixed seed: the same tokens and sampling log-probs (<= 1e-5) with the prompt encoded once per group as
    with every sample encoding it; chunks of 6 split the groups of 4 (the prefill shares within a chunk)."""
    model = build_tiny_model(tok, hidden_size=64, layers=2, heads=2, seed=0)
    gen = HFGenerator(model, tok, batch_size=batch_size)
    prompts = ["12+34=", "What is 100+1? Answer:", "7+8="]
    params = SamplingParams(n=4, temperature=0.9, max_new_tokens=8)
    out = {}
    for mode in ("off", "auto"):
        set_prefix_sharing(model, mode)
        torch.manual_seed(3)
        out[mode] = gen.generate(prompts, params)
        torch.manual_seed(4)
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        out[mode + "_ids"] = gen.generate_ids(ids, params)
    for key in ("", "_ids"):
        a, b = out["off" + key], out["auto" + key]
        for ga, gb in zip(a, b, strict=True):
            for ca, cb in zip(ga, gb, strict=True):
                assert ca.token_ids == cb.token_ids
                torch.testing.assert_close(torch.tensor(cb.logprobs), torch.tensor(ca.logprobs), rtol=0, atol=ATOL)


def test_prefill_cache_covers_all_but_the_last_prompt_token(tok):
    model = build_tiny_model(tok, hidden_size=64, layers=2, heads=2, seed=0).eval()
    ids = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11], [0, 5, 6, 7]])
    attn = (torch.arange(4)[None, :] >= torch.tensor([[1], [0], [1]])).long()
    cache = prefill_shared_prompts(model, ids, attn)
    assert cache is not None and cache.get_seq_length() == 3
    full = model(input_ids=ids[:, :-1], attention_mask=attn[:, :-1],
                 position_ids=(attn.cumsum(-1) - 1).clamp_min(0)[:, :-1], use_cache=True)
    ref = full["cache"] if "cache" in full else full["past_key_values"]
    for layer, ref_layer in zip(cache.layers, ref.layers, strict=True):
        m = attn[:, :-1, None, None].transpose(1, 2).bool()  # [B, 1, P-1, 1]: real tokens only
        torch.testing.assert_close(layer.keys * m, ref_layer.keys * m, rtol=0, atol=ATOL)
        torch.testing.assert_close(layer.values * m, ref_layer.values * m, rtol=0, atol=ATOL)
    assert prefill_shared_prompts(model, ids[:2], attn[:2]) is None  # nothing shared


def test_lora_policy_and_its_reference_pass_with_the_adapter_disabled():
    """peft wraps the model: the keywords pass through to the patched forward; the LoRA gradients and the
    reference log-probs (adapter disabled) match the unshared ones."""
    from critique_rl.config import LoraConfig
    from critique_rl.lora import adapter_disabled, apply_lora

    prompts, comps = _rows(seed=5)
    batch = pack(prompts, comps, pad_id=0)
    base = _model("qwen2", "sdpa")
    plain = apply_lora(base, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # non-zero B matrices: the adapter changes the scores
        for name, p in plain.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    shared = copy.deepcopy(plain)
    _compare(plain, shared, batch)
    m = batch.completion_mask.float()
    with adapter_disabled(plain), adapter_disabled(shared), torch.no_grad():
        a = completion_logprobs(plain, batch).logp
        b = completion_logprobs(shared, batch).logp
        plain_base = completion_logprobs(base, batch).logp  # base is the same module as plain's inner model
    torch.testing.assert_close(b * m, a * m, rtol=0, atol=ATOL)
    torch.testing.assert_close(a * m, plain_base * m, rtol=0, atol=ATOL)


def test_sliding_window_models_share_only_rows_inside_the_window():
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=12,
                      max_window_layers=0, attn_implementation="sdpa")
    model = Qwen2ForCausalLM(cfg)
    set_prefix_sharing(model, "on")
    inside = pack([[5, 6, 7, 8]] * 3, [[9, 10, 11], [12, 13], [14, 15, 16, 17]], pad_id=0)  # rows <= 8 tokens
    _compare(model, copy.deepcopy(model), inside)
    longer = pack([list(range(3, 13))] * 2, [[5, 6, 7], [8, 9]], pad_id=0)  # a 13-token row > window 12
    set_prefix_sharing(model, "on")
    with pytest.raises(ValueError, match="sliding window"):
        shared_plan(model, longer)
    set_prefix_sharing(model, "auto")
    assert shared_plan(model, longer) is None


def test_the_trainer_applies_the_configured_mode_to_its_models(tmp_path):
    from critique_rl.config import MemoryConfig, TrainConfig
    from critique_rl.errors import ConfigError
    from critique_rl.train.prefix_sharing import configure_prefix_sharing, prefix_sharing_mode
    from critique_rl.train.trainer import CritiqueGRPOTrainer

    cfg = TrainConfig(tiny_hidden_size=64, tiny_heads=2, tiny_layers=1, sft_steps=0, sft_examples=16, max_steps=1,
                      generation_batch_size=8, num_generations=4, mini_batch_size=8, eval_n=4, eval_batch_size=4,
                      kl_beta=0.1, prefix_sharing="off", output_dir=str(tmp_path / "run"), progress=False,
                      memory=MemoryConfig(enabled=False))
    t = CritiqueGRPOTrainer(args=cfg)
    t.train()
    assert prefix_sharing_mode(t.model) == "off" and prefix_sharing_mode(t.ref_model) == "off"
    sliding = copy.deepcopy(t.model)
    sliding.config._attn_implementation = "flash_attention_2"  # not sdpa or eager: cannot share exactly
    with pytest.raises(ConfigError, match="prefix_sharing"):
        configure_prefix_sharing([None, sliding], "on")
