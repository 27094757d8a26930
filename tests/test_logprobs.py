"""Chunked log-prob / entropy / top-K functions against naive float64 references, and their callers."""

import pytest
import torch

from critique_rl.algos import (
    chunked_entropy,
    entropy_from_logits,
    logsumexp_chunked,
    selective_log_softmax,
    topk_logprobs,
    topk_reverse_kl,
)
from critique_rl.models import build_tiny_model, build_tiny_tokenizer
from critique_rl.rollout import HFGenerator, SamplingParams
from critique_rl.rollout.hf import SampledLogprobRecorder
from critique_rl.tasks import get_task
from critique_rl.train.batching import CompletionScores, completion_logprobs, pack

ATOL = 1e-5


def _logits(shape, dtype=torch.float32, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _ids(shape, V, seed=1):
    return torch.randint(V, shape, generator=torch.Generator().manual_seed(seed))


def _ref_logp(logits, ids, tau=1.0):
    return torch.log_softmax(logits.double() / tau, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def _ref_entropy(logits, tau=1.0):
    logp = torch.log_softmax(logits.double() / tau, -1)
    return -(logp.exp() * logp).sum(-1)


# (shape, chunk_rows, dtype, tau): chunks that do not divide the rows, one chunk bigger than all rows, 1-row
# chunks, a 150k vocabulary; bf16/fp16 inputs are compared with float64 math on the same rounded values
SMALL = [((4, 5, 37), 3), ((7, 11), 4), ((3, 2, 9), 1), ((5, 13), 1024)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CASES = [(sh, c, dt, tau) for sh, c in SMALL for dt in DTYPES for tau in (1.0, 0.7)]
CASES += [((2, 3, 150_000), 4, torch.float32, 1.0), ((2, 3, 150_000), 4, torch.float32, 0.7),
          ((2, 3, 150_000), 5, torch.bfloat16, 0.7)]


@pytest.mark.parametrize("shape,chunk,dtype,tau", CASES)
def test_forward_matches_float64_reference(shape, chunk, dtype, tau):
    logits = _logits(shape, dtype)
    ids = _ids(shape[:-1], shape[-1])
    lp = selective_log_softmax(logits, ids, chunk, temperature=tau)
    assert lp.dtype == torch.float32 and lp.shape == shape[:-1]
    torch.testing.assert_close(lp.double(), _ref_logp(logits, ids, tau), atol=ATOL, rtol=0)
    lse = logsumexp_chunked(logits, chunk, temperature=tau)
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits.double() / tau, -1), atol=ATOL, rtol=0)
    ent = chunked_entropy(logits, chunk, temperature=tau)
    assert ent.dtype == torch.float32 and not ent.requires_grad
    torch.testing.assert_close(ent.double(), _ref_entropy(logits, tau), atol=ATOL, rtol=0)


def test_non_contiguous_logits_like_logits_to_keep_slice():
    full = _logits((3, 6, 50))
    logits = full[:, :-1]  # what completion_logprobs passes: cannot be flattened without a copy
    assert not logits.is_contiguous()
    ids = _ids((3, 5), 50)
    for chunk in (1, 4, 7, 100):
        torch.testing.assert_close(selective_log_softmax(logits, ids, chunk).double(), _ref_logp(logits, ids),
                                   atol=ATOL, rtol=0)
        torch.testing.assert_close(chunked_entropy(logits, chunk).double(), _ref_entropy(logits), atol=ATOL, rtol=0)


@pytest.mark.parametrize("shape,chunk,tau", [((3, 4, 29), 5, 1.0), ((3, 4, 29), 5, 0.7), ((2, 3, 150_000), 4, 0.7)])
def test_gradients_match_float64_autograd(shape, chunk, tau):
    base = _logits(shape)
    ids = _ids(shape[:-1], shape[-1])
    w = torch.randn(shape[:-1], generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def grads(fn, dtype):
        x = base.to(dtype).clone().requires_grad_(True)
        y = fn(x)
        (y * w.to(y.dtype)).sum().backward()
        return x.grad.double()

    ours = grads(lambda x: selective_log_softmax(x, ids, chunk, temperature=tau), torch.float32)
    ref = grads(lambda x: _ref_logp(x, ids, tau), torch.float64)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    ours = grads(lambda x: chunked_entropy(x, chunk, grad=True, temperature=tau), torch.float32)
    ref = grads(lambda x: _ref_entropy(x, tau), torch.float64)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    ours = grads(lambda x: logsumexp_chunked(x, chunk, temperature=tau), torch.float32)
    ref = grads(lambda x: torch.logsumexp(x / tau, -1), torch.float64)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def test_bf16_gradient_is_bf16_and_close():
    base = _logits((2, 5, 300), torch.bfloat16)
    ids = _ids((2, 5), 300)
    x = base.clone().requires_grad_(True)
    selective_log_softmax(x, ids, 3).sum().backward()
    assert x.grad.dtype == torch.bfloat16
    y = base.double().requires_grad_(True)
    _ref_logp(y, ids).sum().backward()
    torch.testing.assert_close(x.grad.double(), y.grad, atol=1e-2, rtol=1e-2)  # bf16 rounding of the grad


def test_entropy_grad_flag_and_losses_wrapper():
    logits = _logits((2, 3, 17)).requires_grad_(True)
    assert not chunked_entropy(logits, 4).requires_grad
    h = entropy_from_logits(logits)
    assert h.requires_grad
    torch.testing.assert_close(h.double(), _ref_entropy(logits.detach()), atol=ATOL, rtol=0)
    # -inf logits (p = 0) contribute nothing
    masked = torch.tensor([[0.0, 0.0, float("-inf")]])
    torch.testing.assert_close(chunked_entropy(masked), torch.tensor([0.6931471805599453]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape,chunk,k", [((3, 4, 40), 5, 6), ((2, 3, 150_000), 4, 20), ((2, 5), 3, 9)])
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_topk_logprobs_match_log_softmax_topk(shape, chunk, k, tau):
    logits = _logits(shape)
    v, i = topk_logprobs(logits, k, chunk, temperature=tau)
    rv, ri = torch.log_softmax(logits.double() / tau, -1).topk(min(k, shape[-1]), -1)
    assert v.dtype == torch.float32 and i.dtype == torch.long
    assert torch.equal(i, ri)
    torch.testing.assert_close(v.double(), rv, atol=ATOL, rtol=0)


def test_topk_logprobs_bf16_values_and_cap():
    logits = _logits((2, 3, 150_000), torch.bfloat16)
    v, i = topk_logprobs(logits, 8, 4)
    ref = torch.log_softmax(logits.double(), -1)
    torch.testing.assert_close(v.double(), ref.gather(-1, i), atol=ATOL, rtol=0)  # values at the chosen ids
    torch.testing.assert_close(v.double(), ref.topk(8, -1).values, atol=ATOL, rtol=0)  # and they are the top 8
    v, i = topk_logprobs(_logits((2, 4)), 10)
    assert v.shape == (2, 4) and torch.equal(i.sort(-1).values, torch.arange(4).expand(2, 4))


def _old_topk_reverse_kl(student_logits, teacher_topk_logp, teacher_topk_idx):
    s_logp = torch.log_softmax(student_logits.double(), dim=-1).gather(-1, teacher_topk_idx)
    t_logp = teacher_topk_logp.double()
    s_tail = (1.0 - s_logp.exp().sum(-1)).clamp_min(1e-8)
    t_tail = (1.0 - t_logp.exp().sum(-1)).clamp_min(1e-8)
    return (s_logp.exp() * (s_logp - t_logp)).sum(-1) + s_tail * (s_tail.log() - t_tail.log())


@pytest.mark.parametrize("shape,k", [((2, 3, 50), 5), ((2, 3, 150_000), 16)])
def test_topk_reverse_kl_equals_full_log_softmax_formula(shape, k):
    student = _logits(shape, scale=2.0)
    teacher = torch.log_softmax(_logits(shape, scale=2.0, seed=5), -1)
    t_logp, t_idx = teacher.topk(k, -1)
    x = student.clone().requires_grad_(True)
    kl = topk_reverse_kl(x, t_logp, t_idx)
    kl.sum().backward()
    y = student.double().requires_grad_(True)
    ref = _old_topk_reverse_kl(y, t_logp, t_idx)
    ref.sum().backward()
    torch.testing.assert_close(kl.double(), ref.detach(), atol=ATOL, rtol=0)
    torch.testing.assert_close(x.grad.double(), y.grad, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def tiny():
    tok = build_tiny_tokenizer(get_task("addition").texts_for_tokenizer(300), vocab_size=300)
    return build_tiny_model(tok, hidden_size=64, layers=1, heads=2), tok


@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_completion_logprobs_tiny_model_equals_float64(tiny, tau):
    model, tok = tiny
    model.zero_grad(set_to_none=True)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in ["1+2=", "47+38=", "rev:ab="]]
    comps = [tok(c, add_special_tokens=False)["input_ids"] for c in ["3", "85", "ba"]]
    comps = [c + [tok.eos_token_id] for c in comps]
    batch = pack(prompts, comps, tok.pad_token_id)
    out = completion_logprobs(model, batch, tau, entropy="grad", keep_logits=True, chunk_rows=2)
    assert isinstance(out, CompletionScores)
    assert out.logp.dtype == torch.float32 and out.logp.requires_grad and out.entropy.requires_grad
    T = batch.completion_len
    with torch.no_grad():
        ref_logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids, use_cache=False).logits[:, -T - 1 : -1].double()
    torch.testing.assert_close(out.logp.detach().double(), _ref_logp(ref_logits, batch.completion_ids, tau),
                               atol=ATOL, rtol=0)
    torch.testing.assert_close(out.entropy.detach().double(), _ref_entropy(ref_logits, tau), atol=ATOL, rtol=0)
    assert out.logits.dtype == next(model.parameters()).dtype and out.logits.shape == (*batch.completion_ids.shape,
                                                                                        len(tok))
    torch.testing.assert_close(out.logits.detach().double(), ref_logits / tau, atol=ATOL, rtol=0)
    (out.logp.sum() + out.entropy.sum()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())

    with torch.no_grad():
        plain = completion_logprobs(model, batch, tau)
        detached = completion_logprobs(model, batch, tau, entropy="detached")
    assert plain.entropy is None and plain.logits is None
    assert not detached.entropy.requires_grad
    torch.testing.assert_close(detached.entropy.double(), _ref_entropy(ref_logits, tau), atol=ATOL, rtol=0)
    with pytest.raises(ValueError):
        completion_logprobs(model, batch, tau, entropy="yes")


def test_generator_does_not_ask_generate_for_logits_or_scores(tiny, monkeypatch):
    model, tok = tiny
    seen = {}
    real = model.generate

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    out = HFGenerator(model, tok).generate(["1+2="], SamplingParams(n=2, max_new_tokens=3, temperature=0.7))
    assert len(out[0]) == 2 and all(len(c.logprobs) == len(c.token_ids) for c in out[0])
    for key in ("output_logits", "output_scores", "return_dict_in_generate"):
        assert not seen.get(key), key
    assert any(isinstance(p, SampledLogprobRecorder) for p in seen["logits_processor"])


def test_recorder_drops_undone_steps_and_scores_last_token():
    """Simulates ``generate``'s calls: call t sees input_ids ending with token t-1 and the scores for token t.
    A deferred stop check may run one extra step that ``generate`` undoes; it must not shift anything."""
    g = torch.Generator().manual_seed(3)
    B, V, P, T = 2, 11, 3, 4
    scores = torch.randn(T + 1, B, V, generator=g)
    toks = torch.randint(V, (B, T + 1), generator=g)
    for calls in (T, T + 1):
        rec = SampledLogprobRecorder(temperature=0.7)
        ids = torch.zeros(B, P, dtype=torch.long)
        for t in range(calls):
            step_scores = scores[t].clone()
            assert rec(ids, step_scores) is step_scores
            ids = torch.cat([ids, toks[:, t : t + 1]], 1)
        lp = rec.finish(ids[:, P : P + T])
        ref = torch.stack([_ref_logp(scores[t], toks[:, t], 0.7) for t in range(T)], 1)
        torch.testing.assert_close(lp.double(), ref, atol=ATOL, rtol=0)
