"""HFCritic on the tiny in-repo Llama (untrained: generation runs, verdicts are rarely parseable)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from critique_rl.config import CriticConfig
from critique_rl.critics import CritiqueRequest, HFCritic, build_critic
from critique_rl.models import build_tiny_model, build_tiny_tokenizer
from critique_rl.tasks.arithmetic import make_addition

WRONG = CritiqueRequest("47+38=", "84", reference="85", verdict=False)
RIGHT = CritiqueRequest("12+30=", "42", reference="42", verdict=True)
LONG = CritiqueRequest("99+99=", "Let me think: 99+99 is 100+98 which is 198. " * 3, reference="198", verdict=True)


@pytest.fixture(scope="module")
def tiny():
    texts = [r["prompt"] + r["answer"] for r in make_addition("train", 200, 0)]
    texts += ["Verdict: correct", "Verdict: incorrect", "Question Response Reference answer Critique grader"]
    tok = build_tiny_tokenizer(texts, vocab_size=300)
    model = build_tiny_model(tok, hidden_size=64, layers=1, heads=2, max_positions=1024)
    return model, tok


def test_prompt_plain_and_chat_template(tiny):
    model, tok = tiny
    critic = HFCritic(model, tok, max_new_tokens=4)
    p = critic.prompt(WRONG)
    assert "Question:\n47+38=" in p and "Response:\n84" in p and "Reference answer:\n85" in p
    assert p.rstrip().endswith("Critique:")
    tok.chat_template = "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}<|assistant|>"
    try:
        chat = critic.prompt(WRONG)
    finally:
        tok.chat_template = None
    assert chat.startswith("<|user|>") and chat.endswith("<|assistant|>") and "47+38=" in chat
    out = HFCritic(model, tok, max_new_tokens=4, max_regenerations=0).critique([WRONG])
    assert len(out) == 1


def test_batched_left_padded_generation_matches_single(tiny):
    model, tok = tiny
    critic = HFCritic(model, tok, max_new_tokens=6)
    p_short, p_long = critic.prompt(WRONG), critic.prompt(LONG)
    alone = critic._generate_batch([p_short], sample=False)[0]
    batched = critic._generate_batch([p_short, p_long], sample=False)
    assert batched[0].text == alone.text  # left padding + attention mask: padding does not change the output
    assert batched[0].prompt_tokens < batched[1].prompt_tokens
    assert all(0 < g.completion_tokens <= 6 for g in batched)
    assert tok.padding_side == "left"


def test_cot_unparseable_verdicts_regenerate_then_fall_back(tiny):
    model, tok = tiny
    model.train()  # as if called mid-training
    critic = HFCritic(model, tok, max_new_tokens=5, max_regenerations=2, batch_size=2)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    out = critic.critique([WRONG, RIGHT, LONG])
    after = torch.rand(3)
    assert torch.equal(after, expected_next)  # critiquing (incl. sampled regenerations) leaves the RNG alone
    assert model.training  # mode restored
    assert len(out) == 3
    for c, r in zip(out, [WRONG, RIGHT, LONG], strict=True):
        if c.fallback:  # the untrained model writes no verdict
            assert c.regenerations == 2 and c.verdict is r.verdict and c.kind == "ground_truth"
            assert "no parseable verdict" in c.error or "disagrees" in c.error
        else:
            assert c.kind == "cot" and c.verdict is r.verdict
        assert c.completion_tokens > 0 and c.prompt_tokens > 0
    m = critic.metrics()
    n_fb = sum(c.fallback for c in out)
    assert m["critic/requests"] == 3 and m["critic/fallbacks"] == n_fb and m["critic/errors"] == 0
    assert m["critic/regenerations"] >= 2 * n_fb
    assert m["critic/completion_tokens"] > 0


def test_non_cot_kind_makes_no_model_call(tiny):
    model, tok = tiny
    critic = HFCritic(model, tok, kind="ground_truth")
    [c] = critic.critique([WRONG])
    assert c.text == "Your answer 84 is incorrect. The correct answer is 85." and c.completion_tokens == 0


def test_generation_failure_falls_back(tiny):
    model, tok = tiny
    critic = HFCritic(model, tok, max_new_tokens=4)
    critic.max_new_tokens = -1  # generate() rejects this: a real failure inside transformers
    [c] = critic.critique([WRONG])
    assert c.fallback and c.error.startswith("generation failed")
    assert critic.metrics()["critic/errors"] == 1


def test_build_from_path_and_from_policy(tiny, tmp_path: Path):
    model, tok = tiny
    model.save_pretrained(tmp_path / "critic")
    tok.save_pretrained(tmp_path / "critic")
    cfg = CriticConfig(backend="hf", kind="cot", model=str(tmp_path / "critic"), max_tokens=4, max_regenerations=0)
    from_path = build_critic(cfg)
    assert isinstance(from_path, HFCritic) and from_path.max_new_tokens == 4
    assert len(from_path.critique([WRONG])) == 1
    self_critic = build_critic(CriticConfig(backend="hf", kind="cot", model="policy"), policy=model, tokenizer=tok)
    assert isinstance(self_critic, HFCritic) and self_critic.model is model


def test_free_form_prompt_generates_raw_text(tiny):
    model, tok = tiny
    critic = HFCritic(model, tok, max_new_tokens=4, max_regenerations=2)
    r = CritiqueRequest("47+38=", "84", verdict=False, metadata={"prompt": "Lesson as JSON:"})
    [c] = critic.critique([r])
    assert c.kind == "prompt" and c.verdict is None and not c.fallback and c.completion_tokens > 0
    assert critic.metrics()["critic/regenerations"] == 0
