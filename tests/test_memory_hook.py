"""MemoryHook: retrieval before sampling, recording/credit after scoring, snapshots with checkpoints."""

from __future__ import annotations

import json
import sqlite3

import pytest

from critique_rl.config import MemoryConfig
from critique_rl.memory import MemoryBank
from critique_rl.train.memory_hook import MemoryHook, memory_eval_prompts, sft_context_fn

G = 4  # group size


def cfg(**kw) -> MemoryConfig:
    base = dict(enabled=True, embeddings="lexical", top_k_demos=1, top_k_lessons=1)
    base.update(kw)
    return MemoryConfig(**base)


@pytest.fixture
def hook(tmp_path):
    c = cfg()
    bank = MemoryBank(tmp_path / "bank.sqlite", c)
    yield MemoryHook(bank, c, "addition", "test-run")
    bank.close()


def row(a: int, b: int) -> dict:
    return {"prompt": f"{a}+{b}=", "answer": str(a + b), "a": a, "b": b}


def flat(rows: list[dict], answers: list[list[str]]) -> tuple[list[dict], list[str], list[bool]]:
    """Flatten groups: rows repeated G times, completions, correctness."""
    f_rows = [r for r in rows for _ in range(G)]
    comps = [c for group in answers for c in group]
    correct = [c == r["answer"] for c, r in zip(comps, f_rows, strict=True)]
    return f_rows, comps, correct


def counts(bank: MemoryBank) -> dict[str, tuple[int, int]]:
    return {r.id: (r.retrieved, r.helped) for r in bank.list()}


def test_disabled_hook_is_a_no_op(tmp_path):
    c = MemoryConfig(enabled=False, embeddings="lexical")
    with MemoryBank(tmp_path / "b.sqlite", c) as bank:
        h = MemoryHook(bank, c, "addition", "r")
        rows = [row(47, 38)]
        assert h.contexts(rows) == [""]
        f_rows, comps, correct = flat(rows, [["85", "75", "75", "75"]])
        assert h.update(f_rows, comps, correct, [None] * G, 1, G) == {}
        assert len(bank) == 0


def test_empty_bank_gives_empty_contexts(hook):
    assert hook.contexts([row(47, 38), row(12, 13)]) == ["", ""]


def test_update_records_one_demo_per_group_and_lessons_for_failures(hook):
    rows = [row(47, 38), row(12, 13), row(29, 59)]
    answers = [["75", "85", "85", "75"],   # mixed: 1 demo (the first correct), 1 lesson (dropped carry)
               ["25", "25", "25", "25"],   # all right: 1 demo, no lesson
               ["78", "78", "78", "78"]]   # all wrong (dropped carry again): lesson merges into the first
    f_rows, comps, correct = flat(rows, answers)
    m = hook.update(f_rows, comps, correct, [None] * len(comps), step=3, group_size=G)
    bank = hook.bank
    demos, lessons = bank.list("demonstration"), bank.list("lesson")
    assert len(demos) == 2
    assert {d.question for d in demos} == {"47+38=", "12+13="}
    assert all(d.source_run == "test-run" and d.source_step == 3 and "addition" in d.tags for d in demos)
    assert len(lessons) == 1 and lessons[0].merged == 1  # same mistake twice: merged, not duplicated
    assert "carry" in lessons[0].render()
    assert m["memory/size"] == 3.0 and m["memory/lessons"] == 1.0 and m["memory/demonstrations"] == 2.0
    assert m["memory/new_lessons"] == 1.0 and m["memory/merged"] == 1.0 and m["memory/new_demos"] == 2.0
    assert m["memory/retrieved"] == 0.0 and m["memory/hit_success_rate"] is None
    assert m["memory/miss_success_rate"] == pytest.approx(6 / 12)


def test_lessons_are_bounded_per_step_and_all_wrong_groups_go_first(tmp_path):
    c = cfg()
    with MemoryBank(tmp_path / "b.sqlite", c) as bank:
        h = MemoryHook(bank, c, "addition", "r", max_lessons_per_step=1)
        rows = [row(47, 38), row(40, 30)]
        # group 0 has a success and a dropped carry; group 1 is all wrong with a spurious carry
        f_rows, comps, correct = flat(rows, [["85", "75", "75", "75"], ["80", "80", "80", "80"]])
        m = h.update(f_rows, comps, correct, [None] * len(comps), 1, G)
        lessons = bank.list("lesson")
        assert m["memory/new_lessons"] == 1.0 and len(lessons) == 1
        assert "too large" in lessons[0].mistake  # from the all-wrong group (40+30 -> 80), not group 0


def test_credit_counts_episodes_that_saw_a_record(hook):
    rows = [row(47, 38)]
    f_rows, comps, correct = flat(rows, [["75", "75", "75", "75"]])
    hook.update(f_rows, comps, correct, [None] * G, 1, G)  # a carry lesson
    lesson = hook.bank.list("lesson")[0]
    q = [row(58, 27), row(36, 45)]
    ctx = hook.contexts(q)
    assert all("carry" in c for c in ctx)
    assert counts(hook.bank)[lesson.id] == (0, 0)  # retrieval alone counts nothing
    f_rows, comps, correct = flat(q, [["85", "85", "75", "75"], ["81", "71", "71", "71"]])
    m = hook.update(f_rows, comps, correct, [None] * len(comps), 2, G)
    assert counts(hook.bank)[lesson.id] == (2 * G, 3)  # 8 episodes saw it, 3 succeeded
    assert m["memory/context_rate"] == 1.0 and m["memory/retrieved"] >= 1.0
    assert m["memory/hit_success_rate"] == pytest.approx(3 / 8)


def test_update_matches_rows_by_prompt_when_order_changed(hook):
    f_rows, comps, correct = flat([row(47, 38)], [["75"] * G])
    hook.update(f_rows, comps, correct, [None] * G, 1, G)
    lesson = hook.bank.list("lesson")[0]
    q = [row(58, 27), row(36, 45)]
    hook.contexts(q)
    f_rows, comps, correct = flat(q[::-1], [["81"] * G, ["85"] * G])  # reversed order, all correct
    hook.update(f_rows, comps, correct, [None] * len(comps), 2, G)
    assert counts(hook.bank)[lesson.id] == (2 * G, 2 * G)


def test_update_rejects_mismatched_lengths(hook):
    with pytest.raises(ValueError, match="B\\*group_size"):
        hook.update([row(1, 2)] * G, ["3"] * (G - 1), [True] * G, [None] * G, 1, G)


def test_min_score_drops_lexical_top_up(tmp_path):
    c = cfg(top_k_demos=0)
    with MemoryBank(tmp_path / "b.sqlite", c) as bank:
        bank.record("vor:1+2=", "3", 0.0, critique="The answer is wrong. Check the reversal rule.",
                    tags=["addition"], task_name="nosuchtask")
        h = MemoryHook(bank, c, "addition", "r")
        assert h.contexts([{"prompt": "zzz"}]) != [""]  # lexical top-up of a record matching no word
        h.min_score = 0.0
        assert h.contexts([{"prompt": "zzz"}]) == [""]


def test_filter_by_task(tmp_path):
    c = cfg()
    with MemoryBank(tmp_path / "b.sqlite", c) as bank:
        bank.record("47+38=", "85", 1.0, task_name="other", tags=["other"])
        assert MemoryHook(bank, c, "addition", "r").contexts([row(47, 38)]) == [""]
        assert "85" in MemoryHook(bank, c, "addition", "r", filter_by_task=False).contexts([row(47, 38)])[0]


def test_snapshot_and_restore_replace_the_bank(tmp_path):
    c = cfg()
    bank_path = tmp_path / "bank.sqlite"
    bank = MemoryBank(bank_path, c)
    h = MemoryHook(bank, c, "addition", "r")
    f_rows, comps, correct = flat([row(47, 38)], [["85", "75", "75", "75"]])
    h.update(f_rows, comps, correct, [None] * G, 1, G)
    ckpt = tmp_path / "checkpoints" / "step-1"
    ckpt.mkdir(parents=True)
    h.snapshot(ckpt)
    assert (ckpt / "memory.sqlite").is_file()
    f_rows, comps, correct = flat([row(12, 13), row(40, 30)], [["25"] * G, ["80"] * G])
    h.update(f_rows, comps, correct, [None] * len(comps), 2, G)  # writes after the checkpoint
    assert len(bank) == 4
    bank.close()  # a crash would leave the -wal file; restore must not replay it
    MemoryHook.restore(ckpt, bank_path)
    assert not (tmp_path / "bank.sqlite-wal").exists()
    with MemoryBank(bank_path, c) as again:
        assert len(again) == 2
        assert {r.source_step for r in again.list()} == {1}
        # the restored bank is a working bank
        MemoryHook(again, c, "addition", "r").update(f_rows, comps, correct, [None] * len(comps), 2, G)
        assert len(again) == 4


def test_restore_without_snapshot_leaves_the_bank(tmp_path):
    c = cfg()
    bank_path = tmp_path / "bank.sqlite"
    with MemoryBank(bank_path, c) as bank:
        bank.record("1+2=", "3", 1.0, task_name="addition")
    MemoryHook.restore(tmp_path / "no-such-checkpoint", bank_path)
    with MemoryBank(bank_path, c) as bank:
        assert len(bank) == 1


def test_restore_open_bank(tmp_path):
    c = cfg()
    with MemoryBank(tmp_path / "bank.sqlite", c) as bank:
        h = MemoryHook(bank, c, "addition", "r")
        f_rows, comps, correct = flat([row(47, 38)], [["75"] * G])
        h.update(f_rows, comps, correct, [None] * G, 1, G)
        h.snapshot(tmp_path / "snap.sqlite")
        f_rows, comps, correct = flat([row(12, 13)], [["25"] * G])
        h.update(f_rows, comps, correct, [None] * G, 2, G)
        assert len(bank) == 2 and h.contexts([row(12, 14)])[0]
        assert h.restore_open(tmp_path / "snap.sqlite")
        assert len(bank) == 1
        assert "12+13" not in h.contexts([row(12, 14)])[0]  # the retrieval cache was reset
    assert not MemoryHook(MemoryBank(tmp_path / "x.sqlite", c), c, "addition", "r").restore_open(tmp_path / "none")


def test_snapshot_is_a_consistent_sqlite_file(hook, tmp_path):
    f_rows, comps, correct = flat([row(47, 38)], [["85", "75", "75", "75"]])
    hook.update(f_rows, comps, correct, [None] * G, 1, G)
    hook.snapshot(tmp_path / "ck")
    with sqlite3.connect(tmp_path / "ck" / "memory.sqlite") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT count(*) FROM records").fetchone()[0] == 2


def test_eval_prompts_retrieve_without_counting(hook):
    f_rows, comps, correct = flat([row(47, 38)], [["75"] * G])
    hook.update(f_rows, comps, correct, [None] * G, 1, G)
    before = counts(hook.bank)
    hook.contexts([row(1, 1)])
    remembered = hook._last
    table = memory_eval_prompts(hook, [row(58, 27), row(36, 45)], lambda r, ctx: f"{ctx or ''}|{r['prompt']}")
    assert all("carry" in p and p.endswith(q) for q, p in table.items())
    assert counts(hook.bank) == before and hook._last is remembered


def test_sft_context_fn_is_deterministic_and_respects_rate():
    fn = sft_context_fn(lambda r, rng: "CTX " + r["prompt"], rate=0.3, seed=1)
    rows = [row(a, b) for a in range(10, 40) for b in range(10, 20)]
    got = [fn(r) for r in rows]
    assert got == [fn(r) for r in rows]
    share = sum(bool(g) for g in got) / len(got)
    assert 0.2 < share < 0.4
    assert all(g == "" or g == "CTX " + r["prompt"] for g, r in zip(got, rows, strict=True))
    assert all(sft_context_fn(lambda r, rng: "x", 0.0)(r) == "" for r in rows[:20])
    with pytest.raises(ValueError):
        sft_context_fn(lambda r, rng: "x", 1.5)


def test_trainer_with_memory_records_and_resumes(fast_config, tmp_path):
    """The real tiny trainer with memory on: the bank grows, metrics carry memory/*, and a checkpoint holds
    a bank snapshot that resume restores."""
    from critique_rl.train.trainer import CritiqueGRPOTrainer

    bank_path = tmp_path / "bank.sqlite"
    c = cfg(bank_path=str(bank_path))
    conf = fast_config(memory=c, max_steps=2, checkpoint_every=1)
    CritiqueGRPOTrainer(args=conf).train()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "memory/size" in x]
    assert len(steps) == 2 and steps[-1]["memory/size"] > 0
    with MemoryBank(bank_path, c) as bank:
        size = len(bank)
        assert size == steps[-1]["memory/size"]
    from critique_rl.train.checkpoint import latest_checkpoint

    ck = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert ck is not None and (ck / "memory.sqlite").is_file()
    with MemoryBank(ck / "memory.sqlite", c, create=False) as snap:
        assert len(snap) == size
