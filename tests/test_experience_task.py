"""The experience task (issue #28): splits, verifier, rule abstraction, reading warm-up rows, and the memory hook's
retrieval-quality metrics on a real SQLite bank."""

from __future__ import annotations

from critique_rl.config import MemoryConfig
from critique_rl.memory import MemoryBank, Retrieved
from critique_rl.memory.abstraction import Failure, rule_abstraction
from critique_rl.memory.records import Lesson
from critique_rl.tasks import get_task
from critique_rl.tasks.experience import (
    CODES,
    EVAL_NUMBERS,
    EXPERIENCE,
    EXPERIENCED,
    KNOWN,
    NOVEL,
    TRAIN_NUMBERS,
    experience_lesson,
    make_experience,
    make_novel_eval,
    memory_hit,
    reading_rows,
)
from critique_rl.train.memory_hook import MemoryHook, retrieval_quality


def test_registered_and_splits_disjoint() -> None:
    assert get_task("experience") is EXPERIENCE
    assert not set(TRAIN_NUMBERS) & set(EVAL_NUMBERS)
    assert not set(EXPERIENCED) & set(NOVEL) and not set(KNOWN) & (set(EXPERIENCED) | set(NOVEL))
    train = make_experience("train", 2000, 0)
    held = make_experience("eval", 720, 0)
    assert len({r["prompt"] for r in held}) == 720  # distinct, the whole pool
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}  # held-out questions are new ...
    assert {r["entity"] for r in held} == {r["entity"] for r in train} == set(EXPERIENCED)  # ... their facts are not
    novel = make_novel_eval(100, 0)
    assert {r["entity"] for r in novel} <= set(NOVEL) and all(r["novel"] for r in novel)
    r = held[0]
    assert r["answer"] == f"{EXPERIENCED[r['entity']]}{r['a']}" and r["memory_key"] == f"entity:{r['entity']}"
    assert make_experience("eval", 50, 3) == make_experience("eval", 50, 3)


def test_verify_and_mistake() -> None:
    row = make_experience("train", 1, 0)[0]
    assert EXPERIENCE.verify(row["answer"], row["answer"])
    assert EXPERIENCE.verify(f"answer is {row['answer']}", row["answer"])
    wrong = EXPERIENCE.mistake(row)
    assert wrong is not None and wrong.endswith(str(row["a"])) and not EXPERIENCE.verify(wrong, row["answer"])


def test_rule_abstraction_reads_code_off_reference() -> None:
    d = rule_abstraction(Failure("qix:47=", "12347", reference="58347", task="experience"))
    assert d is not None and "583" in d.instead and "qix" in d.situation and "entity:qix" in d.tags
    # the task's abstraction declines an inconsistent or missing reference (the bank's generic fallback then applies)
    assert experience_lesson(Failure("qix:47=", "1", reference="58312", task="experience")) is None
    assert experience_lesson(Failure("qix:47=", "1", reference=None, task="experience")) is None


def test_reading_rows_hold_the_fact_only_in_context() -> None:
    rows = reading_rows(400, 0)
    assert not {r["entity"] for r in rows} & (set(EXPERIENCED) | set(NOVEL))  # task entities never in warm-up
    fresh = [r for r in rows if r["entity"] not in KNOWN]
    known = [r for r in rows if r["entity"] in KNOWN]
    assert 200 < len(fresh) < 350 and known
    for r in fresh:  # the record holding the code is in the context
        assert f"{r['entity']}, its code is {r['code']}" in r["context"] or f"Q: {r['entity']}:" in r["context"]
    assert all(f" {r['entity']}" not in r["context"] for r in known)  # known entities: only noise, or nothing
    assert any(r["context"] == "" for r in known) and any(r["context"] for r in known)
    assert any(r["context"].count("its code is") >= 2 for r in fresh)  # distractors present


def _bank(tmp_path, k_demos: int = 1, k_lessons: int = 2) -> tuple[MemoryBank, MemoryConfig]:
    cfg = MemoryConfig(enabled=True, bank_path=str(tmp_path / "m.sqlite"), top_k_demos=k_demos,
                       top_k_lessons=k_lessons, embeddings="lexical", abstraction="rule")
    return MemoryBank(cfg.bank_path, config=cfg), cfg


def test_hook_records_lessons_and_logs_hit_rate(tmp_path) -> None:
    bank, cfg = _bank(tmp_path)
    hook = MemoryHook(bank, cfg, "experience", "t", max_lessons_per_step=16)
    e1, e2 = sorted(EXPERIENCED)[:2]
    rows = [r for r in make_experience("train", 200, 0) if r["entity"] in (e1, e2)][:4]
    assert {r["entity"] for r in rows} == {e1, e2}
    assert hook.contexts(rows) == [""] * 4  # empty bank
    m = hook.update(rows, ["000" + str(r["a"]) for r in rows], [False] * 4, [None] * 4, 1, 1)
    assert m["memory/hit_rate"] == 0.0 and m["memory/context_tokens"] == 0.0
    assert m["memory/lessons"] == 2.0  # one lesson per entity: same-entity failures merge, entities do not
    # a held-out question on e1: its lesson (with the code) is retrieved; a novel entity gets no hit
    held = [r for r in make_experience("eval", 720, 0) if r["entity"] == e1][:1] + make_novel_eval(1, 0)
    got = hook.retrieve(held)
    assert f"its code is {EXPERIENCED[e1]}" in got[0].text
    assert memory_hit(held[0], got[0].items) is True and memory_hit(held[1], got[1].items) is False
    q = retrieval_quality(held, got)
    assert q["memory/hit_rate"] == 0.5 and q["memory/context_tokens"] > 0
    # next step: contexts now hold the lessons; a success becomes a demonstration tagged with its memory key
    step2 = rows[:1]
    ctx = hook.contexts(step2)
    assert str(CODES[step2[0]["entity"]]) in ctx[0]
    m2 = hook.update(step2, [step2[0]["answer"]], [True], [None], 2, 1)
    assert m2["memory/hit_rate"] == 1.0 and m2["memory/demonstrations"] == 1.0
    (demo,) = bank.list(kind="demonstration")
    assert step2[0]["memory_key"] in demo.tags and "experience" in demo.tags
    bank.close()


def test_retrieval_quality_without_keys() -> None:
    q = retrieval_quality([{"prompt": "a"}], [Retrieved("a", lessons=[Lesson("s", "m", "i")], text="x y z")])
    assert q["memory/hit_rate"] is None and q["memory/context_tokens"] == 3.0


def test_least_useful_order_and_cli(tmp_path) -> None:
    import json

    import typer
    from typer.testing import CliRunner

    from critique_rl.cli_memory import memory_app

    bank, _cfg = _bank(tmp_path)
    ids = {}
    for ent in sorted(EXPERIENCED)[:3]:
        ids[ent] = bank.record(f"{ent}:12=", "00012", 0.0, reference=f"{EXPERIENCED[ent]}12",
                               task_name="experience").id
    a, b, c = sorted(ids)
    for rid, (ret, helped) in {ids[a]: (9, 9), ids[b]: (10, 0), ids[c]: (1, 0)}.items():
        bank.store.write(lambda conn, rid=rid, ret=ret, helped=helped: conn.execute(
            "UPDATE records SET retrieved = ?, helped = ? WHERE id = ?", (ret, helped, rid)))
    least = [r.id for r in bank.list(kind="lesson", order="least_useful")]
    most = [r.id for r in bank.list(kind="lesson", order="useful")]
    assert least == [ids[b], ids[c], ids[a]]  # 1/12 < 1/3 < 10/11
    assert most[0] == ids[a] and most[-1] == ids[b]
    bank.close()
    app = typer.Typer()
    app.add_typer(memory_app, name="memory")
    out = CliRunner().invoke(app, ["memory", "list", "--bank", str(tmp_path / "m.sqlite"), "--sort", "least_useful",
                                   "--json"])
    assert out.exit_code == 0, out.output
    assert [r["id"] for r in json.loads(out.output)] == least
    bad = CliRunner().invoke(app, ["memory", "list", "--bank", str(tmp_path / "m.sqlite"), "--sort", "worst"])
    assert bad.exit_code != 0 and "least_useful" in bad.output


def test_memory_min_score_reaches_the_trainers_hook(tmp_path) -> None:
    from critique_rl.config import TrainConfig, load_config
    from critique_rl.train.trainer import CritiqueGRPOTrainer

    cfg = TrainConfig(tiny_hidden_size=64, tiny_heads=2, tiny_layers=1, sft_steps=0, sft_examples=16, max_steps=1,
                      num_generations=4, generation_batch_size=8, mini_batch_size=8, eval_n=4, eval_batch_size=4,
                      progress=False, output_dir=str(tmp_path / "run"),
                      memory=MemoryConfig(enabled=True, embeddings="lexical", min_score=0.0))
    t = CritiqueGRPOTrainer(args=cfg)
    t.train()
    assert t.memory_hook.min_score == 0.0
    assert load_config(tmp_path / "run" / "config.yaml").memory.min_score == 0.0  # the saved config keeps it
