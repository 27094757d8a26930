"""critique-rl serve end to end: a real HTTP server on 127.0.0.1 over the tiny policy, unchanged openai-client
loops (examples/agent_loop_openai.py) playing guess-the-number concurrently, training steps on what they played,
refinements handed out with the critique in the system message and trained under the plain context, memory
injected, and a kill -9 + --resume that trains no episode twice."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "seed": 0, "device": "cpu", "model": "tiny", "tiny_hidden_size": 32, "tiny_heads": 1, "tiny_layers": 1,
    "tiny_vocab_size": 300, "sft_examples": 200, "sft_steps": 20, "sft_batch_size": 16, "max_steps": 2,
    "num_generations": 4, "generation_batch_size": 8, "mini_batch_size": 8, "learning_rate": 1e-3,
    "critique_on": "all_wrong_groups", "refinements_per_group": 1, "eval_n": 8, "eval_batch_size": 8,
    "eval_every": 0, "checkpoint_every": 1, "log_rollouts": 8, "progress": False,
    "memory": {"enabled": True, "embeddings": "lexical", "top_k_demos": 0, "top_k_lessons": 1, "token_budget": 60},
    "agent": {"env": "guess_number", "env_kwargs": {"max_guesses": 3}, "task_kwargs": {"lo": 1, "hi": 8},
              "max_turns": 3, "max_turn_tokens": 8, "critique_source": "env"},
}


def load_example():
    spec = importlib.util.spec_from_file_location("agent_loop_openai", ROOT / "examples" / "agent_loop_openai.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _loops(mod, base_url: str, workers: int, max_episodes: int | None = None):
    outs: list[list[dict]] = [[] for _ in range(workers)]

    def work(i: int) -> None:
        outs[i] = mod.train_worker(base_url, None, "policy", 3, max_episodes=max_episodes)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(workers)]
    for th in threads:
        th.start()
    return threads, outs


def test_serve_trains_on_concurrent_openai_loops_with_critique_and_memory(tmp_path, monkeypatch):
    from critique_rl.cli_serve import ServeRun
    from critique_rl.config import load_config

    cfg_path = tmp_path / "serve.yaml"
    cfg_path.write_text(yaml.safe_dump({**TINY, "output_dir": str(tmp_path / "run"), "distill_weight": 0.5}))
    cfg = load_config(cfg_path)
    run = ServeRun(cfg, port=0, idle_timeout=4)
    seen: list = []
    src = run.trainer.episodes
    update_batch = type(src).update_batch

    def spy(self, batch, crit, plan):  # what the trainer steps on (on the source's view of each step)
        ub, extra = update_batch(self, batch, crit, plan)
        seen.append((batch, crit, plan, ub))
        return ub, extra

    monkeypatch.setattr(type(src), "update_batch", spy)
    run.start()
    mod = load_example()
    assert mod.is_training_server(run.base_url, None)
    from critique_rl.agents.client import EpisodeClient

    ghost = EpisodeClient(run.base_url)  # a client that takes an episode, plays one turn and disappears
    gone = None
    while gone is None:  # the first handout comes after the warm-up
        gone = ghost.next_task(timeout=30)
    ghost.chat(gone.episode_id, [{"role": "user", "content": "Guess my number from 1 to 8."}], max_tokens=8)
    threads, outs = _loops(mod, run.base_url, workers=4)
    summary = run.wait(timeout=300)
    for th in threads:
        th.join(30)
    assert summary is not None and summary["steps"] == 2
    out = Path(cfg.output_dir)
    played = [r for o in outs for r in o if "success" in r]
    assert sum(len(o) > 0 for o in outs) >= 2  # the loops shared the work
    # the ledger: every step trained on 8 distinct episodes the loops finished and the server accepted
    ledger = _rows(out / "served_episodes.jsonl")
    assert [r["step"] for r in ledger] == [1, 2]
    trained = [e for r in ledger for e in r["episodes"] + r["refinements"]]
    assert len(trained) == len(set(trained)) and all(len(r["episodes"]) == 8 for r in ledger)
    accepted = {r["episode_id"] for r in played if r["accepted"]}
    assert set(trained) <= accepted and gone.episode_id not in trained
    assert run.hub.stats()["dropped_timeout"] >= 1  # its slot was handed out again and played whole
    # refinements: failed tasks handed out again with the critique in the system message ...
    rollouts = _rows(out / "rollouts.jsonl")
    refined = [r["refinement"] for r in rollouts if "refinement" in r]
    assert refined, "no group failed entirely: the test model should fail most groups"
    assert all("Instead, guess the middle" in (r["context"] or "") for r in refined)
    critiqued = [r for r in rollouts if "refinement" in r]
    assert all(r["critique"] in r["refinement"]["context"] for r in critiqued)
    # ... and trained under the plain context: the refined row's prompt is the first observation under the
    # episode's memory context only, exactly as for built-in episodes
    kept = 0
    for batch, crit, plan, ub in seen:
        n_rows = sum(bool(x.turns) for x in batch.episodes)
        for r, (_, _, j) in enumerate(plan.kept):
            ref, src_ep = crit.refined[j], batch.episodes[crit.ref_src[j]]
            text = crit.text_of(crit.ref_src[j])
            assert ref.context.endswith(text) and text not in (src_ep.memory_context or "")
            row = n_rows + r
            assert bool(ub.offpolicy[row])
            P = ub.tokens.input_ids.shape[1] - ub.tokens.completion_len
            prompt = ub.tokens.input_ids[row][:P][ub.tokens.attention_mask[row][:P].bool()].tolist()
            assert prompt == src.renderer.first(ref.turns[0].observation, src_ep.memory_context)
            kept += 1
    assert kept >= 1
    # memory: step 1 wrote lessons; step 2's episodes got one in their system message (the loop sent none)
    step2 = [r for r in rollouts if r["step"] == 2]
    assert any("Lesson" in (r["context"] or "") or "mistake" in (r["context"] or "").lower() for r in step2), step2[0]
    metrics = [m for m in _rows(out / "metrics.jsonl") if m.get("step") == 2 and "memory/context_rate" in m]
    assert metrics and metrics[0]["memory/context_rate"] > 0
    assert sum(r.retrieved for r in run.trainer.episodes.bank.list()) >= 1  # credit to what was retrieved
    # directive distillation on the action tokens of the critiqued episodes (critique in the teacher's context)
    distilled = [m for m in _rows(out / "metrics.jsonl") if m.get("distill/rows")]
    assert distilled and all(m["distill/rows"] >= 1 for m in distilled)
    stats = run.hub.stats()
    assert stats["closed"] and stats["in_flight"] == 0 and stats["trained"] == len(trained)


def _serve(cfg_path: Path, out: Path, *extra: str) -> subprocess.Popen:
    (out / "serve.json").unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "critique_rl.cli", "serve", str(cfg_path), "--port", "0",
                             "--no-progress", *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


def _url(out: Path, proc: subprocess.Popen, timeout: float = 120) -> str:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if (out / "serve.json").is_file():
            return json.loads((out / "serve.json").read_text())["base_url"]
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read().decode()[-2000:])
        time.sleep(0.2)
    raise AssertionError("the server did not start")


def test_a_server_stopped_mid_step_resumes_without_training_an_episode_twice(tmp_path):
    """In process (fast): stop the server while step 2 is being played, then --resume from checkpoint 1."""
    from critique_rl.cli_serve import ServeRun
    from critique_rl.config import load_config

    out = tmp_path / "run"
    cfg_path = tmp_path / "serve.yaml"
    cfg_path.write_text(yaml.safe_dump({**TINY, "output_dir": str(out), "max_steps": 2}))
    mod = load_example()
    run = ServeRun(load_config(cfg_path), port=0)
    played_step2 = threading.Event()
    finish = run.hub.finish

    def finish_then_stop(eid, *a, **kw):  # the server goes down while step 2's episodes are being finished
        res = finish(eid, *a, **kw)
        if run.hub.stats()["trained"] > 0:  # step 1 is trained (and checkpointed): this is step 2's
            played_step2.set()
        return res

    run.hub.finish = finish_then_stop
    run.start()
    threads, _ = _loops(mod, run.base_url, workers=2)
    assert played_step2.wait(240)
    run.stop()
    with pytest.raises(Exception, match="shut down"):
        run.wait(timeout=60)
    for th in threads:
        th.join(60)
    before = _rows(out / "served_episodes.jsonl")
    assert [r["step"] for r in before] == [1]
    run = ServeRun(load_config(cfg_path), port=0, resume=True)
    run.start()
    threads, _ = _loops(mod, run.base_url, workers=2)
    summary = run.wait(timeout=240)
    for th in threads:
        th.join(60)
    assert summary["steps"] == 2
    after = _rows(out / "served_episodes.jsonl")
    assert [r["step"] for r in after] == [1, 2] and after[0] == before[0]
    ids = [e for r in after for e in r["episodes"] + r["refinements"]]
    assert len(ids) == len(set(ids))


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="kill -9")
def test_kill_9_then_resume_trains_no_episode_twice_and_keeps_the_bank(tmp_path):
    out = tmp_path / "run"
    cfg_path = tmp_path / "serve.yaml"
    cfg_path.write_text(yaml.safe_dump({**TINY, "output_dir": str(out), "max_steps": 4}))
    mod = load_example()
    proc = _serve(cfg_path, out)
    try:
        url = _url(out, proc)
        threads, _ = _loops(mod, url, workers=4)
        ckpt = out / "checkpoints"
        t0 = time.time()  # kill -9 once step 2 is checkpointed (step 3 is being played)
        while not (ckpt.is_dir() and any(p.name.endswith("000002") for p in ckpt.iterdir())):
            assert proc.poll() is None and time.time() - t0 < 240, "no second checkpoint"
            time.sleep(0.1)
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        for th in threads:
            th.join(60)  # the loops see the server go away and stop
    finally:
        if proc.poll() is None:
            proc.kill()
    before = _rows(out / "served_episodes.jsonl")
    assert [r["step"] for r in before][:2] == [1, 2]
    proc = _serve(cfg_path, out, "--resume")
    try:
        url = _url(out, proc)
        threads, _ = _loops(mod, url, workers=4)
        assert proc.wait(300) == 0, proc.stdout.read().decode()[-2000:]
        for th in threads:
            th.join(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    after = _rows(out / "served_episodes.jsonl")
    assert [r["step"] for r in after] == [1, 2, 3, 4]  # steps after the checkpoint were cut and trained again
    assert after[:2] == before[:2]
    ids = [e for r in after for e in r["episodes"] + r["refinements"]]
    assert len(ids) == len(set(ids))  # no episode trained twice
    pre_kill = {e for r in before for e in r["episodes"] + r["refinements"]}
    assert not pre_kill & {e for r in after[2:] for e in r["episodes"] + r["refinements"]}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4
    con = sqlite3.connect(out / "memory.sqlite")  # the bank: intact and in use
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con.execute("SELECT COUNT(*) FROM records").fetchone()[0] >= 1
    con.close()


def test_framework_style_tool_loop_trains_and_matches_the_builtin_env(tmp_path, monkeypatch):
    """examples/agent_loop_tools_openai.py (tool registry, `tool` result messages) on price_lookup: a step trains on
    its episodes, and replaying each recorded episode's actions in the built-in env gives the same observations."""
    from critique_rl.agents.lookup_env import PriceLookupEnv
    from critique_rl.cli_serve import ServeRun
    from critique_rl.config import load_config

    spec = importlib.util.spec_from_file_location("agent_loop_tools_openai",
                                                  ROOT / "examples" / "agent_loop_tools_openai.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = {**TINY, "output_dir": str(tmp_path / "run"), "max_steps": 1, "sft_steps": 10, "use_chat_template": "no",
           "memory": {"enabled": False},
           "agent": {"env": "price_lookup", "env_kwargs": {"max_calls": 4}, "max_turns": 4, "max_turn_tokens": 10,
                     "critique_source": "env"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    run = ServeRun(load_config(tmp_path / "c.yaml"), port=0, eval_via="clients")  # held-out episodes: the loop's
    seen: list = []
    update_batch = type(run.trainer.episodes).update_batch  # runs on the source's view of each step
    monkeypatch.setattr(type(run.trainer.episodes), "update_batch",
                        lambda self, b, c, p: (seen.append((b, c)), update_batch(self, b, c, p))[1])
    run.start()
    outs: list = [[], []]
    threads = [threading.Thread(target=lambda i=i: outs.__setitem__(i, mod.play(run.base_url, None)), daemon=True)
               for i in range(2)]
    for th in threads:
        th.start()
    summary = run.wait(timeout=300)
    for th in threads:
        th.join(30)
    assert summary["steps"] == 1 and 0.0 <= summary["eval_accuracy_before_rl"] <= 1.0
    played = [r for o in outs for r in o if "success" in r]
    (ledger,) = _rows(tmp_path / "run" / "served_episodes.jsonl")
    trained = set(ledger["episodes"] + ledger["refinements"])
    assert len(played) >= 8 + 2 * 8 and len(trained) <= len(played) - 2 * 8  # 2 x 8 held-out, never trained
    (batch, crit), = seen
    trajs = list(batch.episodes) + (list(crit.refined) if crit is not None else [])
    assert len(batch.episodes) == 8 and any(len(x.turns) > 1 for x in trajs)
    for x in trajs:
        env = PriceLookupEnv(max_calls=4)
        assert env.reset(x.task) == x.turns[0].observation
        for i, turn in enumerate(x.turns):
            step = env.step(turn.action_text)
            if i + 1 < len(x.turns):
                assert step.observation == x.turns[i + 1].observation
        assert x.success == bool(step.info.get("success", False))


@pytest.mark.parametrize(("args", "says"), [
    (["examples/critique_grpo_cpu.yaml"], "agent.env"),
    (["examples/serve_cpu.yaml", "--idle-timeout", "0"], "--idle-timeout"),
    (["examples/serve_cpu.yaml", "--max-staleness", "-1"], "--max-staleness"),
    (["examples/serve_cpu.yaml", "--eval-via", "nope"], "--eval-via"),
])
def test_serve_refuses_bad_configs_and_flags_in_one_line(tmp_path, monkeypatch, capsys, args, says):
    from critique_rl.cli import main

    argv = [str(ROOT / a) if a.endswith(".yaml") else a for a in args]
    monkeypatch.setattr(sys, "argv", ["critique-rl", "serve", *argv, "--port", "0", "--output-dir",
                                      str(tmp_path / "run")])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and says in err and len(err.strip().splitlines()) == 1
