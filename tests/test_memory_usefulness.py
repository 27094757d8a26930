"""Usefulness that drives the bank (issue #28 item 3): lift credit per retrieved record, ranking by it in
retrieval, pruning by usefulness and age, the CLI's most/least useful tables, lessons quoting their situation."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from critique_rl.cli_memory import memory_app
from critique_rl.config import MemoryConfig
from critique_rl.errors import ConfigError, UserError
from critique_rl.memory import Lesson, MemoryBank
from critique_rl.memory.retrieval import rerank_score
from critique_rl.memory.store import MIGRATIONS, SCHEMA_VERSION, MemoryStore, usefulness
from critique_rl.tasks.experience import EXPERIENCE, lesson_draft
from critique_rl.train.memory_hook import MemoryHook


def cfg(**kw) -> MemoryConfig:
    base = dict(enabled=True, embeddings="lexical", top_k_demos=0, top_k_lessons=1, min_score=None)
    base.update(kw)
    return MemoryConfig(**base)


def lesson(entity: str, code: int) -> Lesson:
    d = lesson_draft(entity, code)
    return Lesson(d.situation, d.mistake, d.instead, d.applies_when, d.tags)


def put(bank: MemoryBank, *recs: Lesson) -> None:
    bank.store.write(lambda c: [MemoryStore.insert(c, r) for r in recs])


def test_v2_bank_migrates_to_lift_keeping_rows(tmp_path: Path) -> None:
    path = tmp_path / "v2.sqlite"
    conn = sqlite3.connect(path)
    for stmts in MIGRATIONS[:2]:
        for stmt in stmts:
            conn.execute(stmt)
    conn.execute("INSERT INTO records (id, kind, key_text, dedup_hash, payload, retrieved, helped, created_at, "
                 "updated_at) VALUES ('L-old', 'lesson', 'k', 'h', ?, 4, 3, 1.0, 1.0)",
                 (json.dumps({"situation": "s", "mistake": "m", "instead": "i"}),))
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()
    store = MemoryStore(path)
    assert store.schema_version == SCHEMA_VERSION == 3
    rec = store.get("L-old")
    assert (rec.retrieved, rec.helped, rec.lift, rec.example) == (4, 3, 0.0, "")
    store.close()


def test_usefulness_formula() -> None:
    # lift / (retrieved + 2): 6 episodes, 4 of them one success above baseline -> 3 / 8
    assert usefulness(3.0, 6) == pytest.approx(0.375)
    assert lesson("qix", 583).usefulness == 0.0
    # similarity relative to the best candidate + weight x usefulness
    assert rerank_score(2.0, 4.0, 0.5, 0.5) == pytest.approx(0.75)
    assert rerank_score(0.3, -0.1, -0.2, 1.0) == pytest.approx(0.1)


def test_hook_credits_lift_against_the_step_mean(tmp_path: Path) -> None:
    """Two groups of 4: the one whose prompt held lesson qix gets 3 right, the one with lesson bod 0 right.
    Step mean = 3/8. qix: lift = 3 - 4 * 3/8 = +1.5; bod: lift = 0 - 1.5 = -1.5."""
    c = cfg()
    with MemoryBank(tmp_path / "b.sqlite", c) as bank:
        qix, bod = lesson("qix", 583), lesson("bod", 120)
        put(bank, qix, bod)
        hook = MemoryHook(bank, c, EXPERIENCE.name, "r", max_lessons_per_step=0)
        rows = [{"prompt": "qix:47=", "answer": "58347"}, {"prompt": "bod:11=", "answer": "12011"}]
        ctx = hook.contexts(rows)
        assert "583" in ctx[0] and "120" in ctx[1]
        flat = [r for r in rows for _ in range(4)]
        correct = [True, True, True, False, False, False, False, False]
        m = hook.update(flat, ["x"] * 8, correct, [None] * 8, 1, 4)
        assert m["memory/credit_baseline"] == pytest.approx(3 / 8)
        assert m["memory/credited_records"] == 2
        got = {r.id: (r.retrieved, r.helped, r.lift) for r in bank.list()}
        assert got[qix.id] == (4, 3, pytest.approx(1.5))
        assert got[bod.id] == (4, 0, pytest.approx(-1.5))
        assert bank.get(qix.id).usefulness == pytest.approx(1.5 / 6)
        assert [r.id for r in bank.list("lesson", order="useful")] == [qix.id, bod.id]
        assert [r.id for r in bank.list("lesson", order="least_useful")] == [bod.id, qix.id]


def test_bank_credit_with_baseline(tmp_path: Path) -> None:
    with MemoryBank(tmp_path / "b.sqlite", cfg()) as bank:
        a = lesson("qix", 583)
        put(bank, a)
        assert bank.credit([a.id, a.id], True, baseline=0.25) == 1  # ids counted once per episode
        assert bank.credit([a.id], False, baseline=0.25) == 1
        rec = bank.get(a.id)
        assert (rec.retrieved, rec.helped, rec.lift) == (2, 1, pytest.approx(0.5))
        assert bank.credit([a.id], True) == 1  # old form: helped only
        assert (bank.get(a.id).retrieved, bank.get(a.id).helped) == (2, 2)
        with pytest.raises(UserError, match="baseline"):
            bank.credit([a.id], True, baseline=1.5)


def test_retrieval_ranks_by_usefulness(tmp_path: Path) -> None:
    """Two lessons about qix match the query equally; the one that did worse than baseline drops below the one
    that helped only when usefulness_weight > 0."""
    bad = Lesson("When a question names qix", "guessed the code", "its code is 111", "qix", ("experience",),
                 retrieved=10, lift=-5.0, created_at=1.0)
    good = Lesson("When a question names qix", "guessed the code", "its code is 583", "qix", ("experience",),
                  retrieved=10, lift=5.0, created_at=2.0)
    path = tmp_path / "b.sqlite"
    with MemoryBank(path, cfg(usefulness_weight=0.0)) as bank:
        put(bank, bad, good)
        sim_order = [r.id for r, _ in bank.search("qix:47=", k=2, kind="lesson")]
    assert set(sim_order) == {bad.id, good.id}
    for weight, first in ((0.0, sim_order[0]), (0.5, good.id)):
        with MemoryBank(path, cfg(usefulness_weight=weight)) as bank:
            got = bank.retrieve("qix:47=", count=False)
            assert [x.id for x in got.lessons] == [first]
            assert got.scores[first] > 0  # the reported score stays the similarity


def test_usefulness_weight_is_validated() -> None:
    with pytest.raises(ConfigError, match="usefulness_weight"):
        MemoryConfig(usefulness_weight=-0.1)


def test_prune_by_usefulness_and_age(tmp_path: Path) -> None:
    now = time.time()
    old_unused = Lesson("s1", "m1", "i1", created_at=now - 40 * 86400, updated_at=now - 40 * 86400)
    old_useful = Lesson("s2", "m2", "i2", retrieved=8, helped=8, lift=4.0, created_at=now - 40 * 86400)
    new_unused = Lesson("s3", "m3", "i3")
    harmful = Lesson("s4", "m4", "i4", retrieved=6, helped=0, lift=-3.0)
    harmful_thin = Lesson("s5", "m5", "i5", retrieved=2, helped=0, lift=-1.0)
    with MemoryBank(tmp_path / "b.sqlite", cfg()) as bank:
        put(bank, old_unused, old_useful, new_unused, harmful, harmful_thin)
        res = bank.prune(min_usefulness=0.0, min_retrieved=5, dry_run=True)
        assert res.removed == [harmful.id] and res.by_reason == {"usefulness": 1}
        res = bank.prune(useless_after_days=30)
        assert res.removed == [old_unused.id]
        assert {r.id for r in bank.list()} == {old_useful.id, new_unused.id, harmful.id, harmful_thin.id}
        with pytest.raises(UserError, match="min_usefulness"):
            bank.prune(min_usefulness=2.0)


def test_failure_lesson_quotes_its_situation(tmp_path: Path) -> None:
    with MemoryBank(tmp_path / "b.sqlite", cfg()) as bank:
        r1 = bank.record("qix:47=", "12347", 0.0, reference="58347", task_name=EXPERIENCE.name)
        r2 = bank.record("qix:12=", "99912", 0.0, reference="58312", task_name=EXPERIENCE.name)
        assert r1.action == "new" and r2.action == "merged" and r2.id == r1.id
        rec = bank.get(r1.id)
        assert rec.example == "qix:47="  # the first situation is kept on a merge
        assert "qix:47=" not in rec.render()  # audit text, not prompt text
        long = bank.record("When solving " + "word " * 200, "bad", 0.0, critique="Wrong. You should check it.",
                           task_name="open_text")
        ex = bank.get(long.id).example
        assert len(ex) <= 200 and ex.endswith("...") and ex.startswith("When solving word")
        out = tmp_path / "x.jsonl"
        bank.export_jsonl(out)
    with MemoryBank(tmp_path / "c.sqlite", cfg()) as other:
        other.import_jsonl(out)
        assert other.get(r1.id).example == "qix:47="


def test_cli_useful_and_show(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite"
    good = Lesson("When a question names qix", "guessed", "its code is 583", retrieved=4, helped=4, lift=3.0,
                  example="qix:47=")
    bad = Lesson("When a question names bod", "guessed", "its code is 120", retrieved=4, helped=0, lift=-2.0)
    mid = Lesson("When a question names zup", "guessed", "its code is 300")
    with MemoryBank(path, cfg()) as bank:
        put(bank, good, bad, mid)
    runner = CliRunner()
    res = runner.invoke(memory_app, ["useful", "--bank", str(path), "--n", "2", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert [r["id"] for r in data["most_useful"]] == [good.id, mid.id]
    assert [r["id"] for r in data["least_useful"]] == [bad.id, mid.id]
    assert data["most_useful"][0]["usefulness"] == pytest.approx(0.5)
    res = runner.invoke(memory_app, ["useful", "--bank", str(path), "--n", "1"], env={"COLUMNS": "160"})
    assert res.exit_code == 0 and "most useful" in res.stdout and "least useful" in res.stdout
    assert res.stdout.index(good.id) < res.stdout.index(bad.id)
    res = runner.invoke(memory_app, ["show", good.id, "--bank", str(path)], env={"COLUMNS": "160"})
    assert res.exit_code == 0 and "written from" in res.stdout and "qix:47=" in res.stdout
    assert "+0.500" in res.stdout
    res = runner.invoke(memory_app, ["prune", "--bank", str(path), "--min-usefulness", "0", "--min-retrieved", "3",
                                     "--json"])
    assert json.loads(res.stdout)["ids"] == [bad.id]
