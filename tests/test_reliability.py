"""Reliability under bad numbers, dead critics, crashes and user data (issue #15, item 7).

- a NaN/inf loss or gradient never reaches the weights: the update is skipped, training stops after
  ``max_nonfinite_steps`` in a row, and neither a checkpoint nor ``final/`` ever holds NaN weights;
- a critic whose requests fail is warned about, stops the run past ``critic.max_failure_share``, and a dead
  endpoint is backed off by a circuit breaker;
- checkpoints: files fsynced before the rename, a manifest of sizes, a torn newest checkpoint skipped on
  ``--resume`` (with a warning), critic counters carried over;
- a run that died before its first checkpoint does not restart on the dead attempt's memory bank;
- bring-your-own data (the README's `train_file` + `verifier` path) trains with the default settings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from critic_server import CriticServer

from critique_rl.config import CriticConfig, MemoryConfig, TrainConfig
from critique_rl.critics import CritiqueRequest, OpenAICritic
from critique_rl.critics.base import BaseCritic, CritiqueFailure
from critique_rl.errors import UserError
from critique_rl.train import checkpoint as ckpt
from critique_rl.train.metrics import read_jsonl
from critique_rl.train.trainer import CritiqueGRPOTrainer
from critique_rl.train.update import NonFiniteGuard

QUICK = dict(tiny_hidden_size=64, tiny_heads=2, tiny_layers=1, sft_steps=0, sft_examples=64, max_steps=2,
             num_generations=4, generation_batch_size=8, mini_batch_size=8, eval_n=4, eval_batch_size=4,
             checkpoint_every=100, progress=False, log_rollouts=2)


def quick(tmp_path: Path, name: str = "run", **overrides) -> TrainConfig:
    return TrainConfig(**{**QUICK, "output_dir": str(tmp_path / name), **overrides})


def rl_rows(out: Path) -> list[dict]:
    return [r for r in read_jsonl(out / "metrics.jsonl") if "loss/total" in r]


def all_finite(model_dir: Path) -> bool:
    from safetensors.torch import load_file

    return all(bool(torch.isfinite(t).all()) for t in load_file(str(model_dir / "model.safetensors")).values())


# ---------------------------------------------------------------------------------------------------------
# non-finite numbers

def test_guard_counts_skips_in_a_row():
    g = NonFiniteGuard(3)
    g.record(True)
    g.record(True)
    g.record(False)  # a good update resets the count
    g.record(True)
    g.record(True)
    with pytest.raises(UserError, match="3 updates in a row"):
        g.record(True, float("nan"), float("inf"))
    assert g.total == 5


def test_infinite_reward_never_reaches_the_weights(tmp_path):
    """The `reward_weights: [.inf]` failure, reproduced through a reward of inf: every update is NaN. The
    updates are skipped, the run stops with one line after 3 in a row, and every checkpoint holds finite weights."""
    def inf_reward(prompts, completions, **_):
        return [float("inf")] * len(completions)

    cfg = quick(tmp_path, max_steps=6, checkpoint_every=1, critique_on="none", max_nonfinite_steps=3)
    with pytest.raises(UserError) as info:
        CritiqueGRPOTrainer(args=cfg, reward_funcs=[inf_reward]).train()
    msg = str(info.value)
    assert "\n" not in msg and "NaN/inf in 3 updates in a row" in msg and "max_nonfinite_steps" in msg
    out = Path(cfg.output_dir)
    assert not (out / "final").exists()
    cps = ckpt.list_checkpoints(out / "checkpoints")
    assert cps and all(all_finite(cp / "model") for cp in cps)
    assert [r["nonfinite_skipped"] for r in rl_rows(out)] == [1.0, 1.0]


def test_one_bad_update_is_skipped_and_training_goes_on(tmp_path):
    calls = {"n": 0}

    def flaky_reward(prompts, completions, **_):
        calls["n"] += 1
        bad = calls["n"] == 2  # the second step's rewards are NaN-producing
        return [float("inf") if bad else float(len(c) % 2) for c in completions]

    cfg = quick(tmp_path, max_steps=4, critique_on="none")
    trainer = CritiqueGRPOTrainer(args=cfg, reward_funcs=[flaky_reward])
    summary = trainer.train()
    assert summary["steps"] == 4
    rows = rl_rows(Path(cfg.output_dir))
    assert [r["nonfinite_skipped"] for r in rows] == [0.0, 1.0, 0.0, 0.0]
    assert all_finite(Path(cfg.output_dir) / "final")


def test_nan_weights_are_never_checkpointed(tmp_path):
    from critique_rl.models import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer(["1+1=2", "2+2=4"], 300)
    model = build_tiny_model(tok, 64, 1, 2)
    good = ckpt.save_checkpoint(tmp_path, 1, model, tok, {"x": 1})
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    with pytest.raises(UserError, match="NaN/inf"):
        ckpt.save_checkpoint(tmp_path, 2, model, tok, {"x": 2})
    assert ckpt.list_checkpoints(tmp_path) == [good] and all_finite(good / "model")


# ---------------------------------------------------------------------------------------------------------
# checkpoints: fsync, manifest, torn newest checkpoint

def _tiny():
    from critique_rl.models import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer(["1+1=2", "2+2=4"], 300)
    return build_tiny_model(tok, 64, 1, 2), tok


def test_every_file_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    model, tok = _tiny()
    synced: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename
    seen_at_rename: dict[str, list[str]] = {}

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else str(fd))
        return real_fsync(fd)

    def rename(src, dst):
        seen_at_rename[str(dst)] = list(synced)
        return real_rename(src, dst)

    monkeypatch.setattr(ckpt.os, "fsync", fsync)
    monkeypatch.setattr(ckpt.os, "rename", rename)
    final = ckpt.save_checkpoint(tmp_path, 3, model, tok, {"x": 1})
    before = seen_at_rename[str(final)]
    tmp = str(tmp_path / ".tmp-checkpoint-000003")
    files = [str(p.relative_to(final)) for p in final.rglob("*") if p.is_file()]
    assert "manifest.json" in files and "model/model.safetensors" in files
    if os.path.exists("/proc/self/fd"):
        for rel in files:
            assert f"{tmp}/{rel}" in before, rel


def test_truncated_or_torn_checkpoints_are_detected(tmp_path):
    model, tok = _tiny()
    a = ckpt.save_checkpoint(tmp_path, 1, model, tok, {"x": 1}, keep=5)
    b = ckpt.save_checkpoint(tmp_path, 2, model, tok, {"x": 2}, keep=5)
    assert ckpt.checkpoint_problem(b) is None
    weights = b / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert "truncated" in ckpt.checkpoint_problem(b)
    warnings: list[str] = []
    assert ckpt.latest_valid_checkpoint(tmp_path, warn=warnings.append) == a
    assert len(warnings) == 1 and "checkpoint-000002" in warnings[0] and "falling back" in warnings[0]
    # an older checkpoint without a manifest: the trainer state must load
    (a / ckpt.MANIFEST_FILE).unlink()
    state = a / ckpt.STATE_FILE
    state.write_bytes(state.read_bytes()[:50])
    assert "does not load" in ckpt.checkpoint_problem(a)
    assert ckpt.latest_valid_checkpoint(tmp_path) is None


def test_resume_skips_a_torn_newest_checkpoint_and_keeps_critic_counters(tmp_path, capsys):
    """Kill-and-resume with a damaged newest checkpoint: the run warns, resumes from the previous one, redoes
    those steps once each, and the critic's cumulative counters continue instead of restarting at 0."""
    first = quick(tmp_path, max_steps=2, checkpoint_every=1, keep_checkpoints=3, critique_on="all")
    CritiqueGRPOTrainer(args=first).train()
    out = Path(first.output_dir)
    per_step = rl_rows(out)[0]["critic/requests"]
    assert per_step > 0 and rl_rows(out)[1]["critic/requests"] == 2 * per_step
    torn = out / "checkpoints" / "checkpoint-000002" / "model" / "model.safetensors"
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])
    capsys.readouterr()

    second = quick(tmp_path, max_steps=3, checkpoint_every=1, keep_checkpoints=3, critique_on="all")
    summary = CritiqueGRPOTrainer(args=second).train(resume=True)
    err = " ".join(capsys.readouterr().err.split())
    assert "checkpoint-000002 is damaged" in err and "falling back" in err
    assert summary["steps"] == 3
    rows = rl_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]  # every step once
    assert rows[1]["critic/requests"] == 2 * per_step  # counters carried over from checkpoint-1, not from 0
    assert rows[2]["critic/requests"] == 3 * per_step
    assert ckpt.checkpoint_problem(ckpt.latest_checkpoint(out / "checkpoints")) is None


# ---------------------------------------------------------------------------------------------------------
# memory bank of an attempt that died before its first checkpoint

def test_begin_fresh_run_puts_the_bank_back(tmp_path):
    from critique_rl.memory import MemoryBank
    from critique_rl.train.memory_hook import MemoryHook

    bank_path, run_dir = tmp_path / "shared.sqlite", tmp_path / "run"
    with MemoryBank(bank_path, MemoryConfig(embeddings="lexical")) as bank:
        bank.record(task="1+1=", trajectory="2", reward=1.0)
    assert MemoryHook.begin_fresh_run(bank_path, run_dir) is False  # first start: remembered
    with MemoryBank(bank_path, MemoryConfig(embeddings="lexical")) as bank:
        bank.record(task="2+2=", trajectory="4", reward=1.0)  # the attempt that dies
        assert bank.stats()["demonstrations"]["count"] == 2
    assert MemoryHook.begin_fresh_run(bank_path, run_dir) is True  # restart: put back
    with MemoryBank(bank_path, MemoryConfig(embeddings="lexical")) as bank:
        assert bank.stats()["demonstrations"]["count"] == 1

    fresh = tmp_path / "run2" / "memory.sqlite"  # a bank that did not exist at the first start
    assert MemoryHook.begin_fresh_run(fresh, tmp_path / "run2") is False
    with MemoryBank(fresh, MemoryConfig(embeddings="lexical")) as bank:
        bank.record(task="3+3=", trajectory="6", reward=1.0)
    assert MemoryHook.begin_fresh_run(fresh, tmp_path / "run2") is True and not fresh.exists()


def test_restart_before_the_first_checkpoint_does_not_reuse_the_dead_bank(tmp_path, capsys):
    class DiesAtTheEnd(CritiqueGRPOTrainer):
        def _finish(self, t_start):
            raise KeyboardInterrupt("killed before the first checkpoint")

    class Inspect(CritiqueGRPOTrainer):
        def _setup(self, resume):
            out = super()._setup(resume)
            self.bank_at_start = self.memory.stats()
            return out

    cfg = quick(tmp_path, max_steps=2, memory=MemoryConfig(enabled=True, embeddings="lexical"))
    with pytest.raises(KeyboardInterrupt):
        DiesAtTheEnd(args=cfg).train()
    assert not ckpt.list_checkpoints(Path(cfg.output_dir) / "checkpoints")
    t = Inspect(args=cfg)
    capsys.readouterr()
    t.train()
    err = capsys.readouterr().err
    assert "put back" in err
    start = t.bank_at_start
    assert start["demonstrations"]["count"] == 0 and start["lessons"]["count"] == 0


# ---------------------------------------------------------------------------------------------------------
# dead critics: warnings, failure share, circuit breaker

class DeadCritic(BaseCritic):
    """A cot critic whose every request fails like an HTTP 401."""

    url = "http://dead.example/v1"
    last_error = "HTTP 401 unauthorized"

    def __init__(self) -> None:
        super().__init__("cot")

    async def _generate(self, items):
        return [CritiqueFailure("HTTP 401 unauthorized") for _ in items]


def test_all_critic_requests_failing_stops_the_run(tmp_path, capsys):
    cfg = quick(tmp_path, max_steps=5, critique_on="all")  # 8 requests a step: the share is checked from step 2
    with pytest.raises(UserError) as info:
        CritiqueGRPOTrainer(args=cfg, critic=DeadCritic()).train()
    msg = str(info.value)
    assert "\n" not in msg and "failed 16 of 16 requests" in msg and "max_failure_share" in msg
    assert "HTTP 401" in msg
    assert "warning: critic at http://dead.example/v1" in capsys.readouterr().err


def test_failing_critic_with_share_one_trains_and_warns(tmp_path, capsys):
    cfg = quick(tmp_path, max_steps=2, critique_on="all", critic=CriticConfig(max_failure_share=1.0))
    summary = CritiqueGRPOTrainer(args=cfg, critic=DeadCritic()).train()
    assert summary["steps"] == 2
    err = capsys.readouterr().err
    assert "warning: critic at http://dead.example/v1: 8 of 8 requests failed so far (step 1" in err
    assert "16 of 16 requests failed so far (step 2" in err


WRONG = CritiqueRequest("47+38=", "47+38 = 84", reference="85", verdict=False, metadata={"answer": "84"})


def test_circuit_breaker_backs_off_a_dead_endpoint(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    script = [{"status": 401}] * 3 + [{"content": "Carry the one.\nVerdict: incorrect"}]
    with CriticServer(script) as server:
        critic = OpenAICritic(model="critic-test", kind="cot", base_url=server.base_url, timeout_s=2.0,
                              max_retries=2, max_regenerations=0, max_concurrency=1, circuit_breaker_failures=3,
                              circuit_breaker_cooldown_s=0.3)
        t0 = time.perf_counter()
        out = critic.critique([WRONG] * 10)
        assert time.perf_counter() - t0 < 6.0
        assert server.requests == 3  # 3 failures open the circuit; the other 7 never reach the server
        assert all(c.fallback for c in out)
        assert sum("circuit open" in (c.error or "") for c in out) == 7
        m = critic.metrics()
        assert m["critic/short_circuited"] == 7 and m["critic/circuit_open"] == 1.0 and m["critic/errors"] == 10
        time.sleep(0.35)  # cooldown over: one probe goes out, succeeds, and closes the circuit
        [c] = critic.critique([WRONG])
        assert not c.fallback and server.requests == 4
        assert critic.metrics()["critic/circuit_open"] == 0.0
        critic.close()


def test_circuit_breaker_off():
    with CriticServer([{"status": 401}]) as server:
        critic = OpenAICritic(model="critic-test", kind="cot", base_url=server.base_url, timeout_s=2.0,
                              max_retries=0, max_regenerations=0, max_concurrency=1, circuit_breaker_failures=0)
        critic.critique([WRONG] * 6)
        assert server.requests == 6
        critic.close()


# ---------------------------------------------------------------------------------------------------------
# bring-your-own data with the defaults (README "your own data")

def _own_data(tmp_path: Path) -> tuple[Path, Path]:
    rows = [{"prompt": f"What is {a} plus {b}? ", "answer": str(a + b)} for a in range(3, 20) for b in range(5, 9)]
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    verifier = tmp_path / "my_verifier.py"
    verifier.write_text("def check(completion, answer):\n    return completion.strip().startswith(answer)\n")
    return data, verifier


def test_own_jsonl_with_tiny_model_and_demo_settings(tmp_path):
    """Used to die with KeyError: 'a' (addition's carry mistake applied to user rows for refinement demos)."""
    data, verifier = _own_data(tmp_path)
    cfg = quick(tmp_path, train_file=str(data), eval_file=str(data), verifier=f"{verifier}:check", sft_steps=5,
                sft_mistake_rate=0.6, sft_refine_fraction=0.3, critique_on="all_wrong_groups")
    summary = CritiqueGRPOTrainer(args=cfg).train()
    assert summary["steps"] == 2 and (Path(cfg.output_dir) / "final" / "config.json").is_file()


@pytest.mark.slow
def test_readme_own_data_path_through_the_cli(tmp_path):
    data, verifier = _own_data(tmp_path)
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(f"train_file: {data}\nverifier: '{verifier}:check'\nmodel: tiny\nsft_steps: 20\n"
                   "max_steps: 2\neval_n: 8\nsft_refine_fraction: 0.3\nsft_mistake_rate: 0.6\n"
                   "tiny_hidden_size: 64\ntiny_heads: 2\ntiny_layers: 1\nnum_generations: 4\n"
                   "generation_batch_size: 8\nmini_batch_size: 8\n")
    res = subprocess.run([sys.executable, "-m", "critique_rl.cli", "train", str(cfg), "--output-dir",
                          str(tmp_path / "run"), "--no-progress"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "RL gain" in res.stdout and (tmp_path / "run" / "final" / "config.json").is_file()


def test_sft_warmup_skips_nan_losses_and_stops():
    from critique_rl.models import build_tiny_model, build_tiny_tokenizer
    from critique_rl.train.sft import sft_warmup

    tok = build_tiny_tokenizer(["1+1=2", "2+2=4"], 300)
    model = build_tiny_model(tok, 64, 1, 2)
    before = [p.detach().clone() for p in model.parameters()]

    def nan_logits(module, args, output):
        output.logits = output.logits * float("nan")
        return output

    model.register_forward_hook(nan_logits)
    with pytest.raises(UserError, match="SFT warm-up: the loss or gradient norm was NaN/inf in 3 steps"):
        sft_warmup(model, tok, [("1+1=", "2"), ("2+2=", "4")], steps=10, batch_size=2, lr=1e-3)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
