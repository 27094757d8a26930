"""Episodes under ``accelerate launch``: a 2-process run (gloo, CPU) equals the 1-process run of the same global
batch, memory included.

With ``agent.seed_per_task`` each task's episodes are sampled under a seed of (seed, step, the task's place in
the global batch), so both runs play the same episodes; memory is read on every process and written once, by the
main process, from the gathered episodes. What is compared (the tolerance is for the float rounding of the
gradient all-reduce and of micro-batches of 4 instead of 8 rows):

- every RL step's episode metrics (success, returns, turns, critiques, refinements, memory) exactly;
- the loss within ``LOSS_ATOL`` and every parameter's sum within ``WEIGHT_RTOL`` (relative) after training;
- the memory bank, record by record (kind, text, payload without episode ids, tags, counters and lift, step), exactly.

And a 2-process run stopped after step 2 and resumed (``--resume``: the main process puts the checkpoint's bank in
place before the other opens it) ends where the straight 2-process run ends: metrics, weights and bank exactly.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from critique_rl.train.metrics import read_jsonl

LOSS_ATOL = 1e-4
WEIGHT_RTOL = 1e-4

CONFIG = dict(
    tiny_hidden_size=64, tiny_heads=2, tiny_layers=1, tiny_vocab_size=300, sft_steps=40, sft_batch_size=16,
    sft_examples=40, sft_learning_rate=3e-3, sft_refine_fraction=0.3, max_steps=3, num_generations=4,
    generation_batch_size=8, mini_batch_size=4, eval_n=4, eval_batch_size=4, checkpoint_every=100, progress=False,
    log_rollouts=2, device="cpu", critique_on="wrong", learning_rate=5e-3,
    agent={"env": "guess_number", "max_turns": 3, "max_turn_tokens": 4, "env_kwargs": {"max_guesses": 3},
           "task_kwargs": {"lo": 1, "hi": 4}, "seed_per_task": True},
    memory={"enabled": True, "embeddings": "lexical", "top_k_demos": 1, "top_k_lessons": 1, "token_budget": 40},
)
EXACT = ("train/accuracy", "reward/mean", "episode/mean_turns", "episode/action_tokens", "critique/critiqued",
         "critique/refinements", "critique/kept", "memory/lessons", "memory/demonstrations", "memory/new",
         "memory/merged", "memory/context_rate", "memory/hit_success_rate")


def bank_records(path: Path) -> list[tuple]:
    """The bank's records in insertion order, without what is random per run (ids, episode ids, timestamps)."""
    conn = sqlite3.connect(str(path))
    try:
        rows = conn.execute("SELECT kind, key_text, payload, tags, retrieved, helped, lift, merged, source_step "
                            "FROM records ORDER BY seq").fetchall()
    finally:
        conn.close()
    out = []
    for kind, key, payload, tags, retrieved, helped, lift, merged, step in rows:
        data = {k: v for k, v in json.loads(payload).items() if k not in ("source_ids", "episode_id")}
        out.append((kind, key, json.dumps(data, sort_keys=True), tags, retrieved, helped, lift, merged, step))
    return out


@pytest.mark.slow
def test_two_processes_on_episodes_with_memory_equal_one_process_and_resume(tmp_path):
    from test_distributed import _ranks, launch

    def run(name: str, nproc: int, resume: bool = False, **kw) -> tuple[list[dict], list[dict]]:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(dict(CONFIG, output_dir=str(tmp_path / name), **kw)))
        launch(["train", str(path), str(tmp_path / f"{name}.out")] + (["--resume"] if resume else []), nproc)
        return read_jsonl(tmp_path / name / "metrics.jsonl"), _ranks(tmp_path / f"{name}.out", nproc)

    rows2, ranks2 = run("two", 2)
    rows1, ranks1 = run("one", 1)
    assert ranks2[0]["world"] == 2 and ranks2[0]["checksum"] == ranks2[1]["checksum"]
    steps1 = [r for r in rows1 if "loss/total" in r]
    steps2 = [r for r in rows2 if "loss/total" in r]
    assert [r["step"] for r in steps2] == [1, 2, 3] and sum(1 for r in rows2 if r.get("final")) == 1
    assert rows2[0]["eval/accuracy"] == rows1[0]["eval/accuracy"]
    for a, b in zip(steps1, steps2, strict=True):
        for k in EXACT:
            assert a.get(k) == b.get(k), (a["step"], k, a.get(k), b.get(k))
        assert abs(a["loss/total"] - b["loss/total"]) <= LOSS_ATOL, (a["step"], a["loss/total"], b["loss/total"])
    for x, y in zip(ranks1[0]["checksum"], ranks2[0]["checksum"], strict=True):
        assert abs(x - y) <= WEIGHT_RTOL * max(1.0, abs(x)), (x, y)
    one, two = bank_records(tmp_path / "one" / "memory.sqlite"), bank_records(tmp_path / "two" / "memory.sqlite")
    assert one and one == two
    assert {r[0] for r in one} == {"lesson", "demonstration"}  # the seeded run records both kinds
    assert any(r[4] > 0 for r in one)  # retrieval was credited (records were read on both processes)
    assert steps2[-1]["memory/context_rate"] > 0
    # retrieval on every process: rank 1's logged episodes carry the memory context after step 1 wrote the bank
    roll = read_jsonl(tmp_path / "two" / "rollouts.jsonl")
    assert any(r.get("rank") == 1 and r["step"] > 1 and r.get("context") for r in roll)

    run("part", 2, max_steps=2, checkpoint_every=1)
    rows_r, ranks_r = run("part", 2, resume=True, checkpoint_every=1)
    steps_r = [r for r in rows_r if "loss/total" in r]
    assert [r["step"] for r in steps_r] == [1, 2, 3]
    for a, b in zip(steps2, steps_r, strict=True):
        assert {k: a.get(k) for k in (*EXACT, "loss/total")} == {k: b.get(k) for k in (*EXACT, "loss/total")}
    assert ranks_r[0]["checksum"] == ranks2[0]["checksum"] == ranks_r[1]["checksum"]
    assert bank_records(tmp_path / "part" / "memory.sqlite") == two
