"""LoRA through peft on the real in-repo tiny Llama (tied embeddings): only the adapter trains, the disabled
adapter gives the exact base logits, adapter save/load round-trips, merging leaves the live model alone."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from critique_rl.config import LoraConfig
from critique_rl.errors import UserError
from critique_rl.lora import (
    adapter_disabled,
    apply_lora,
    is_lora,
    load_adapter,
    merged_copy,
    save_adapter,
    trainable_parameter_summary,
)
from critique_rl.models import build_tiny_model, build_tiny_tokenizer

pytest.importorskip("peft")

TEXTS = ["12+34=46", "5+7=12", "40+2=42", "99+1=100", "rev:abc=cba", "rev:hello=olleh"]
CFG = LoraConfig(enabled=True, r=4, alpha=8.0, dropout=0.0)


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(TEXTS * 10)


@pytest.fixture(scope="module")
def batch(tok) -> torch.Tensor:
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    return enc["input_ids"]


def base_model(tok) -> LlamaForCausalLM:
    return build_tiny_model(tok, hidden_size=64, layers=2, heads=2, seed=0).eval()


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.detach().clone()


def base_name(peft_name: str) -> str:
    """peft parameter name -> the name the same tensor had in the plain model."""
    return peft_name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def train(model: torch.nn.Module, ids: torch.Tensor, steps: int = 4, lr: float = 2e-2) -> list[float]:
    """A few AdamW steps on next-token NLL. All parameters go to the optimizer (the worst case: a trainer that
    forgot to filter): frozen ones must still not move."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        losses.append(float(loss.detach()))
    model.eval()
    return losses


@pytest.fixture(scope="module")
def trained(tok, batch):
    """(PeftModel after training, the base logits before wrapping, {name: base tensor before})."""
    base = base_model(tok)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    ref = logits(base, batch)
    with torch.random.fork_rng():  # adapter init and dropout: deterministic, global RNG untouched
        torch.manual_seed(0)
        model = apply_lora(base, LoraConfig(enabled=True, r=4, alpha=8.0, dropout=0.05))
        losses = train(model, batch)
    assert losses[-1] < losses[0]  # the adapter really learns
    return model, ref, before


def test_only_adapter_parameters_change(tok, batch, trained) -> None:
    model, _, before = trained
    assert is_lora(model) and not is_lora(base_model(tok))
    inner = model.base_model.model
    assert inner.lm_head.weight is inner.model.embed_tokens.weight  # tied embeddings survive wrapping
    base_seen, adapters = set(), []
    for name, p in model.named_parameters():
        if "lora_" in name:
            adapters.append(name)
            assert p.requires_grad
            continue
        assert not p.requires_grad, name
        assert p.grad is None or not p.grad.any(), name
        bn = base_name(name)
        assert torch.equal(p.detach(), before[bn]), f"base parameter {bn} changed"
        base_seen.add(bn)
    # every base tensor was checked (tied lm_head is the embedding: named_parameters lists it once)
    assert base_seen == set(before)
    assert {n.split(".")[-4] for n in adapters} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                  "up_proj", "down_proj"}  # all-linear, no head
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.detach().abs().sum() > 0 for p in lora_b)  # B starts at zero: it moved
    summary = trainable_parameter_summary(model)
    n_adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    n_base = sum(t.numel() for t in before.values())
    assert summary == {"trainable": n_adapter, "total": n_base + n_adapter,
                       "fraction": n_adapter / (n_base + n_adapter)}
    assert 0 < summary["fraction"] < 0.2


def test_fresh_adapter_is_a_no_op_and_rejects_double_wrap(tok, batch) -> None:
    base = base_model(tok)
    ref = logits(base, batch)
    model = apply_lora(base, CFG)
    assert torch.equal(logits(model, batch), ref)
    with pytest.raises(UserError, match="already has LoRA"):
        apply_lora(model, CFG)


def test_adapter_disabled_gives_exact_base_logits(tok, batch, trained) -> None:
    model, ref, _ = trained
    live = logits(model, batch)
    assert not torch.allclose(live, ref, atol=1e-3)  # the adapter changes the output
    with adapter_disabled(model):
        assert torch.equal(logits(model, batch), ref)
        with adapter_disabled(model):  # nested: still disabled after the inner block exits
            pass
        assert torch.equal(logits(model, batch), ref)
    assert torch.equal(logits(model, batch), live)  # re-enabled afterwards
    plain = base_model(tok)
    with adapter_disabled(plain):  # no adapter: a null context
        assert torch.equal(logits(plain, batch), ref)


def test_save_and_load_adapter_round_trip(tok, batch, trained, tmp_path: Path) -> None:
    model, _, _ = trained
    live = logits(model, batch)
    folder = save_adapter(model, tmp_path / "ckpt" / "model")
    files = {p.name: p.stat().st_size for p in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files)
    assert set(files) <= {"adapter_config.json", "adapter_model.safetensors", "README.md"}  # no base weights
    base_model(tok).save_pretrained(tmp_path / "full")
    full = (tmp_path / "full" / "model.safetensors").stat().st_size
    assert files["adapter_model.safetensors"] < 0.2 * full

    loaded = load_adapter(base_model(tok), folder, trainable=True)
    assert is_lora(loaded)
    assert torch.allclose(logits(loaded.eval(), batch), live, atol=1e-6)
    lora_params = [p for n, p in loaded.named_parameters() if "lora_" in n]
    assert lora_params and all(p.requires_grad for p in lora_params)
    assert not any(p.requires_grad for n, p in loaded.named_parameters() if "lora_" not in n)
    frozen = load_adapter(base_model(tok), folder, trainable=False)
    assert not any(p.requires_grad for p in frozen.parameters())

    with pytest.raises(UserError, match="adapter_config.json"):
        load_adapter(base_model(tok), tmp_path / "full")


def test_merged_copy_is_plain_and_leaves_live_model_untouched(tok, batch, trained, tmp_path: Path) -> None:
    model, _, _ = trained
    live = logits(model, batch)
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    a_param = next(p for n, p in model.named_parameters() if "lora_A" in n)
    a_param.grad = torch.ones_like(a_param)

    merged = merged_copy(model)
    assert type(merged) is LlamaForCausalLM and not is_lora(merged)
    assert not any("lora" in n for n, _ in merged.named_modules())
    assert all(type(m).__module__.split(".")[0] != "peft" for m in merged.modules())
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    assert torch.allclose(logits(merged.eval(), batch), live, atol=1e-5)
    merged.save_pretrained(tmp_path / "final")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    assert type(reloaded) is LlamaForCausalLM
    assert torch.allclose(logits(reloaded, batch), live, atol=1e-5)

    # the live model: still LoRA, still trainable, same weights, same grads, same logits
    assert is_lora(model) and torch.equal(a_param.grad, torch.ones_like(a_param))
    a_param.grad = None
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), state[n]), n
        assert p.requires_grad == ("lora_" in n), n
    assert torch.equal(logits(model, batch), live)
    assert merged_copy(base_model(tok)) is not None  # a plain model: nothing to merge


def test_bad_target_module_is_a_user_error(tok) -> None:
    with pytest.raises(UserError, match=r"lora\.target_modules.*q_proj") as err:
        apply_lora(base_model(tok), LoraConfig(enabled=True, target_modules=["qkv_proj"]))
    assert "\n" not in str(err.value)


def test_missing_peft_is_a_user_error(tok, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    with pytest.raises(UserError, match="pip install peft"):
        apply_lora(base_model(tok), CFG)
    assert not is_lora(base_model(tok))
