"""The fused LM head: log-probs and entropy from hidden states, equal to the float64 naive formula in value
and gradient, and the same scores through a real model as the logits path."""

from __future__ import annotations

import pytest
import torch

from critique_rl.algos.logprobs import linear_selective_log_softmax
from critique_rl.models import build_tiny_model, build_tiny_tokenizer
from critique_rl.train.batching import completion_logprobs, enable_fused_head, fused_head_enabled, pack


def _naive(h, w, ids, tau):
    z = (h.double() @ w.double().t()) / tau
    lp = torch.log_softmax(z, -1)
    return lp.gather(-1, ids.unsqueeze(-1)).squeeze(-1), -(lp.exp() * lp).sum(-1)


@pytest.mark.parametrize(("n", "hdim", "vocab", "chunk", "tau"), [(7, 16, 50, 3, 1.0), (5, 8, 150_000, 2, 0.7)])
def test_values_and_gradients_match_float64(n, hdim, vocab, chunk, tau):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, hdim, generator=g, requires_grad=True)
    w = (torch.randn(vocab, hdim, generator=g) * 0.3).requires_grad_(True)
    ids = torch.randint(0, vocab, (n,), generator=g)
    lp, ent = linear_selective_log_softmax(h, w, ids, chunk, temperature=tau, with_entropy=True)
    h64, w64 = h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    lp64, ent64 = _naive(h64, w64, ids, tau)
    torch.testing.assert_close(lp.double(), lp64.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(ent.double(), ent64.detach(), rtol=0, atol=1e-5)
    ga, gb = torch.randn(n, generator=g), torch.randn(n, generator=g)
    (lp * ga + ent * gb).sum().backward()
    (lp64 * ga.double() + ent64 * gb.double()).sum().backward()
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)


def test_without_entropy_returns_none_and_grads_flow():
    h = torch.randn(4, 6, requires_grad=True)
    w = torch.randn(11, 6, requires_grad=True)
    lp, ent = linear_selective_log_softmax(h, w, torch.tensor([1, 2, 3, 10]), 2)
    assert ent is None
    lp.sum().backward()
    assert h.grad.abs().sum() > 0 and w.grad.abs().sum() > 0


def test_a_real_model_scores_the_same_through_the_fused_head():
    tok = build_tiny_tokenizer(["12+34=46", "7+8=15", "100+1=101"] * 20, vocab_size=300)
    batch = pack([[5, 6, 7], [8, 9]], [[10, 11, 12, 13], [14, 15]], tok.pad_token_id)
    plain = build_tiny_model(tok, hidden_size=64, layers=2, heads=2, seed=0)
    fused = build_tiny_model(tok, hidden_size=64, layers=2, heads=2, seed=0)
    assert not fused_head_enabled(fused)
    enable_fused_head(fused)
    assert fused_head_enabled(fused)
    a = completion_logprobs(plain, batch, 0.8, entropy="grad")
    b = completion_logprobs(fused, batch, 0.8, entropy="grad")
    torch.testing.assert_close(a.logp, b.logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.entropy, b.entropy, rtol=1e-5, atol=1e-5)
    m = batch.completion_mask.float()
    ((a.logp + 0.1 * a.entropy) * m).sum().backward()
    ((b.logp + 0.1 * b.entropy) * m).sum().backward()
    for (name, p), q in zip(plain.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    # keep_logits (top-K distillation) still takes the logits path
    assert completion_logprobs(fused, batch, keep_logits=True).logits is not None
    # generation is unaffected by the patch
    out = fused.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    assert out.shape == (1, 6)


def test_trainer_with_the_fused_head_matches_the_logits_path(fast_config, tmp_path):
    """Same run twice, fused head on and off: the same losses, gradient norms and KL to a reference copy
    (which gets its own patched forward)."""
    from critique_rl.train.metrics import read_jsonl
    from critique_rl.train.trainer import CritiqueGRPOTrainer

    runs = []
    for mode in ("off", "on"):
        out = tmp_path / mode
        cfg = fast_config(max_steps=2, sft_steps=5, critique_on="none", entropy_coef=0.05, kl_beta=0.1,
                          fused_lm_head=mode, output_dir=str(out))
        trainer = CritiqueGRPOTrainer(args=cfg)
        trainer.train()
        assert fused_head_enabled(trainer.model) is (mode == "on")
        runs.append([r for r in read_jsonl(out / "metrics.jsonl") if "loss/total" in r])
    for a, b in zip(*runs, strict=True):
        for key in ("loss/total", "grad_norm", "entropy", "kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert runs[0][-1]["kl"] > 0


def test_plain_and_chunked_token_logprobs_agree(monkeypatch):
    """Small inputs take the plain fp32 log-softmax (reproducible runs), large ones the chunked path."""
    import critique_rl.train.batching as batching

    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 97, generator=g, dtype=torch.float64).float().requires_grad_(True)
    ids = torch.randint(0, 97, (3, 5), generator=g)
    plain = batching.token_logprobs(x, ids, temperature=0.9)
    monkeypatch.setattr(batching, "PLAIN_FP32_BYTES", 0)
    chunked = batching.token_logprobs(x, ids, 4, temperature=0.9)
    torch.testing.assert_close(plain, chunked, rtol=0, atol=1e-5)
    (gp,) = torch.autograd.grad(plain.sum(), x)
    (gc,) = torch.autograd.grad(chunked.sum(), x)
    torch.testing.assert_close(gp, gc, rtol=0, atol=1e-6)


def test_large_vocabularies_get_smaller_row_chunks(monkeypatch):
    from critique_rl.algos import logprobs

    seen: list[int] = []
    real = logprobs._LinearLogProb.apply
    monkeypatch.setattr(logprobs._LinearLogProb, "apply",
                        lambda h, w, ids, tau, rows, ent: seen.append(rows) or real(h, w, ids, tau, rows, ent))
    h = torch.randn(8, 4)
    for vocab, expected in ((512, 1024), (151_936, (160 << 20) // (4 * 151_936))):
        w = torch.randn(vocab, 4)
        logprobs.linear_selective_log_softmax(h, w, torch.zeros(8, dtype=torch.long), 1024)
        assert seen[-1] == expected
    assert seen[-1] == 276  # a Qwen2.5-sized head: ~160 MiB of float32 logits per chunk


def test_autocast_head_casts_the_weight_one_vocabulary_slice_at_a_time(monkeypatch):
    """Under bf16 autocast the head equals the autocast product (bf16 inputs, bf16 logits, float32 softmax) in
    value and gradient, with the weight cast in vocabulary slices: no whole bf16 copy of W is ever allocated."""
    import critique_rl.algos.logprobs as lpmod

    n, hdim, vocab = 6, 16, 3000
    g = torch.Generator().manual_seed(1)
    h = torch.randn(n, hdim, generator=g, requires_grad=True)
    w = (torch.randn(vocab, hdim, generator=g) * 0.3).requires_grad_(True)
    ids = torch.randint(0, vocab, (n,), generator=g)
    monkeypatch.setattr(lpmod, "FUSED_WEIGHT_SLICE_BYTES", 1)  # the 1024-row minimum slice: 3 slices of W
    cast_rows = []
    real_to = torch.Tensor.to

    def spy_to(self, *a, **k):
        out = real_to(self, *a, **k)
        if out.dtype == torch.bfloat16 and self.dim() == 2 and self.shape[1] == hdim and self.shape[0] > n:
            cast_rows.append(self.shape[0])
        return out

    monkeypatch.setattr(torch.Tensor, "to", spy_to)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, ent = linear_selective_log_softmax(h, w, ids, 4, with_entropy=True)
    ga, gb = torch.randn(n, generator=g), torch.randn(n, generator=g)
    (lp * ga + ent * gb).sum().backward()
    monkeypatch.setattr(torch.Tensor, "to", real_to)
    assert cast_rows and max(cast_rows) == 1024 and sum(cast_rows) % vocab == 0  # slices only, whole V each pass

    h2, w2 = h.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = torch.nn.functional.linear(h2, w2).float()
    lsm = torch.log_softmax(z, -1)
    lp2, ent2 = lsm.gather(-1, ids.unsqueeze(-1)).squeeze(-1), -(lsm.exp() * lsm).sum(-1)
    (lp2 * ga + ent2 * gb).sum().backward()
    torch.testing.assert_close(lp, lp2, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent, ent2, rtol=0, atol=1e-5)
    torch.testing.assert_close(h.grad, h2.grad, rtol=2e-2, atol=2e-3)  # the reference's dh goes through bf16
    torch.testing.assert_close(w.grad, w2.grad, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("with_entropy_grad", [False, True])
def test_backward_holds_one_chunk_buffer_at_a_time(with_entropy_grad):
    """The backward's live bytes (traced tensor by tensor) stay within one float32 [chunk_rows, V] buffer plus
    dW, dh and slice-sized temporaries: a chunk's buffer is freed before the next chunk allocates its own."""
    from critique_rl.gpu_memory import LiveTensorTracker

    n, hdim, vocab, chunk = 64, 16, 20_000, 8
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, hdim, generator=g, requires_grad=True)
    w = (torch.randn(vocab, hdim, generator=g) * 0.3).requires_grad_(True)
    ids = torch.randint(0, vocab, (n,), generator=g)
    lp, ent = linear_selective_log_softmax(h, w, ids, chunk, with_entropy=True)
    loss = lp.sum() + (ent.sum() if with_entropy_grad else ent.detach().sum())
    tr = LiveTensorTracker()
    with tr:
        base = tr.current
        loss.backward()
    chunk_buf = chunk * vocab * 4
    dw, dh = vocab * hdim * 4, n * hdim * 4
    slice_tmp = chunk * 16384 * 4 if with_entropy_grad else 0
    extra = tr.peak - base
    assert extra >= dw + chunk_buf  # dW and the chunk buffer were traced
    # dW twice (the float32 accumulator and the gradient autograd stores: as TRL's head), one chunk buffer; a
    # second live chunk buffer would add another chunk_buf (640 kB) past this bound
    assert extra <= 2 * dw + dh + chunk_buf + slice_tmp + chunk_buf // 2, (extra, dw, chunk_buf)
