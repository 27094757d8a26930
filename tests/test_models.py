import pytest
import torch

from critique_rl.models import build_tiny_model, build_tiny_tokenizer, load_policy
from critique_rl.rollout import HFGenerator, SamplingParams
from critique_rl.tasks import get_task
from critique_rl.train.batching import completion_logprobs, pack


def _tiny():
    tok = build_tiny_tokenizer(get_task("addition").texts_for_tokenizer(500), vocab_size=300)
    return build_tiny_model(tok, hidden_size=64, layers=1, heads=2), tok


def test_tokenizer_splits_digits_and_roundtrips():
    _, tok = _tiny()
    ids = tok("47+38=85", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "47+38=85"
    pieces = tok.convert_ids_to_tokens(ids)
    assert all(len(p) == 1 for p in pieces if p.isdigit())
    assert tok.pad_token_id != tok.eos_token_id


def test_save_and_load_roundtrip(tmp_path):
    model, tok = _tiny()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    m2, t2 = load_policy(tmp_path, device="cpu")
    x = torch.tensor([tok("12+34=", add_special_tokens=False)["input_ids"]])
    assert torch.allclose(model(x).logits, m2(x).logits, atol=1e-6)
    assert t2("12+34=")["input_ids"] == tok("12+34=")["input_ids"]
    assert m2.config.hidden_size // m2.config.num_attention_heads >= 32


@pytest.mark.parametrize("temperature,greedy", [(0.7, False), (1.0, False), (1.0, True)])
def test_generation_logprobs_match_training_forward(temperature, greedy):
    """Sampling logprobs recorded by the generator equal a fresh forward on the packed batch
    (left-padded prompts of different lengths, right-padded completions); greedy records temperature 1."""
    torch.manual_seed(0)
    model, tok = _tiny()
    gen = HFGenerator(model, tok)
    prompts = ["1+2=", "47+38=", "rev:ab="]
    out = gen.generate(prompts, SamplingParams(n=3, max_new_tokens=5, temperature=temperature, greedy=greedy))
    flat = [c for g in out for c in g]
    batch = pack([tok(p, add_special_tokens=False)["input_ids"] for p in prompts for _ in range(3)],
                 [c.token_ids for c in flat], tok.pad_token_id)
    with torch.no_grad():
        lp = completion_logprobs(model, batch, temperature=temperature).logp
    for i, c in enumerate(flat):
        assert len(c.logprobs) == len(c.token_ids)
        assert torch.allclose(lp[i, : len(c.token_ids)], torch.tensor(c.logprobs), atol=1e-4)
        assert batch.completion_mask[i].sum().item() == len(c.token_ids)
