"""The experience task's reading warm-up (critique_rl/train/experience_reader.py): names spelled the same in the
question and in a record, the curriculum's first chunk without distractors, training until the check reaches
its target or the cap."""

from __future__ import annotations

import pytest

from critique_rl.models import build_tiny_model, build_tiny_tokenizer
from critique_rl.tasks.experience import EXPERIENCED, KNOWN, NOVEL, reading_rows
from critique_rl.train.experience_reader import context_prompt, curriculum_rows, tokenizer_texts, train_until


def _pieces(tok, text: str) -> list[str]:
    return tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])


def _same_spelling(tok, name: str) -> bool:
    """Whether ``name`` is the same pieces at a question's start and after the space in a lesson."""
    question = _pieces(tok, f"{name}:47=")[:-4]
    lesson = _pieces(tok, f"- When a question names {name}, its")
    piece = lesson[lesson.index("Ġnames") + 1: lesson.index(",")]
    return piece[0] == "Ġ" and piece[1:] == question


def test_tokenizer_texts_drop_names_so_a_name_is_spelled_the_same_everywhere() -> None:
    rows = reading_rows(3000, 3)
    texts = [context_prompt(r, r["context"]) + r["answer"] for r in rows]
    stripped = tokenizer_texts(texts + ["Wrong. qix has code 583. qix:47="])
    assert stripped[-1] == "Wrong.  has code 583. :47="
    assert all(f"names {r['entity']}," not in t and not t.startswith(f"{r['entity']}:")
               for r, t in zip(rows, stripped, strict=False))
    assert "names , its code is" in stripped[0] or "Q: :" in stripped[0] or stripped[0].startswith(":")
    names = [*EXPERIENCED, *NOVEL, *KNOWN]
    same = sum(_same_spelling(build_tiny_tokenizer(stripped, 512), n) for n in names)
    before = sum(_same_spelling(build_tiny_tokenizer(texts, 512), n) for n in names)
    # measured: 42 of 44 (two names start with a template word's merge, "Ġmi", "Ġco") vs 4 of 44
    assert same >= len(names) - 3 and before <= len(names) // 2, (same, before)


def test_curriculum_first_chunk_has_no_distractors_and_chunks_draw_fresh_rows() -> None:
    first, second = curriculum_rows(5, 0, 300), curriculum_rows(5, 1, 300)
    fresh = [r for r in first if r["entity"] not in KNOWN]
    assert all(r["context"].count("its code is") + r["context"].count("\nA: ") <= 2 for r in fresh)
    assert all(r["context"].count("names ") <= 1 for r in fresh)  # its own lesson at most, no other entity's
    assert any(r["context"].count("names ") >= 2 for r in second)
    assert {r["entity"] for r in first if r["entity"] not in KNOWN} != {r["entity"] for r in second}
    assert not {r["entity"] for r in first} & {r["entity"] for r in reading_rows(400, 5 + 10_000)} - set(KNOWN)


def _tiny() -> tuple:
    tok = build_tiny_tokenizer(["abc:12=34512", "0123456789"], 300)
    return build_tiny_model(tok, 64, 1, 2, seed=0), tok


def test_train_until_stops_at_the_target_or_the_cap() -> None:
    model, tok = _tiny()
    pairs = [("abc:12=", "34512")] * 8
    scores = iter([0.2, 0.5, 0.95, 0.99])
    got = train_until(model, tok, lambda i: pairs, lambda: next(scores), chunk_steps=2, max_steps=20, target=0.9,
                      batch=4, lr=1e-3, seed=0)
    assert got["reached"] and got["steps"] == 6 and got["check"] == 0.95
    assert [h["steps"] for h in got["history"]] == [2, 4, 6]
    seen: list[int] = []
    low = train_until(model, tok, lambda i: seen.append(i) or pairs, lambda: 0.1, chunk_steps=3, max_steps=10,
                      target=0.9, batch=4, lr=1e-3, seed=0)
    assert not low["reached"] and low["steps"] == 9 and seen == [0, 1, 2]  # the cap: no chunk past max_steps
    with pytest.raises(ValueError, match="chunk_steps"):
        train_until(model, tok, lambda i: pairs, lambda: 1.0, chunk_steps=5, max_steps=4, target=0.9, batch=4,
                    lr=1e-3, seed=0)
