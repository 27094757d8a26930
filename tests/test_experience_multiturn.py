"""The multi-turn experience env (issue #28 item 1): feedback reveals the fact within an episode; only memory
carries it to the next."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from critique_rl.agents.registry import get_env_spec
from critique_rl.agents.warmup import play_scripted
from critique_rl.config import MemoryConfig
from critique_rl.memory import MemoryBank
from critique_rl.tasks.experience import EXPERIENCED, NOVEL, lesson_draft
from critique_rl.tasks.experience_multiturn import (
    NAME,
    SECOND_TRY_REWARD,
    ExperienceVaultEnv,
    VaultCritic,
    make_tasks,
    reader,
    reader_episode,
)


def task(entity: str = "qix", code: int = 583, number: int = 47) -> dict:
    return {"prompt": f"{entity}:{number}=", "answer": f"{code}{number}", "entity": entity, "code": code,
            "a": number, "memory_key": f"entity:{entity}"}


def test_first_try_success_second_try_half_reward() -> None:
    env = ExperienceVaultEnv()
    assert env.reset(task()) == "qix:47="
    r = env.step("12347")
    assert (r.reward, r.done) == (0.0, False) and r.observation == "Wrong. qix has code 583. qix:47="
    r = env.step("58347")
    assert (r.reward, r.done, r.info["success"]) == (SECOND_TRY_REWARD, True, False)
    env.reset(task())
    r = env.step("58347")
    assert (r.reward, r.done, r.info["success"]) == (1.0, True, True)
    env.reset(task())
    env.step("1")
    r = env.step("2")
    assert (r.reward, r.done, r.info["success"]) == (0.0, True, False) and "58347" in r.observation


def test_bad_rows_and_settings_are_named() -> None:
    with pytest.raises(ValueError, match="'code'"):
        ExperienceVaultEnv().reset({"prompt": "qix:47=", "answer": "58347", "entity": "qix"})
    with pytest.raises(ValueError, match="max_tries"):
        ExperienceVaultEnv(0)
    with pytest.raises(ValueError, match="split"):
        make_tasks("test", 3, 0)


def test_splits_held_out_numbers_and_novel_entities() -> None:
    train, held, novel = make_tasks("train", 200, 0), make_tasks("eval", 100, 0), make_tasks("novel", 20, 0)
    assert {r["entity"] for r in held} <= set(EXPERIENCED) and {r["entity"] for r in novel} <= set(NOVEL)
    assert not {r["a"] for r in train} & {r["a"] for r in held}


def test_spec_loads_by_path_and_demonstrator_copies_the_reveal() -> None:
    spec = get_env_spec("critique_rl.tasks.experience_multiturn:spec")
    assert spec.name == NAME
    traj = play_scripted(spec, {}, task(), spec.demonstrator, random.Random(0), max_turns=2)
    assert [t.action_text for t in traj.turns][1] == "58347"
    assert traj.turns[0].action_text != "58347" and not traj.success and traj.total_reward == SECOND_TRY_REWARD
    crit = VaultCritic().critique_episodes([traj])[0]
    assert crit.verdict is False and "583" in crit.text and "58347" in crit.text


def test_reader_answers_from_a_matching_record_only() -> None:
    ctx = "Lessons:\n- When a question names bod, its code is 120. Avoid: guessed the code.\n" \
          "- When a question names qix, its code is 583. Avoid: guessed the code."
    assert reader("qix:47=", ctx) == "58347"
    assert reader("zup:47=", ctx) != "58347"  # no record about zup: falls back to the demonstrator's guess
    assert reader("qix:47=", "Q: qix:12=\nA: 58312") == "58347"
    ep = reader_episode(task(), ctx)
    assert ep.success and ep.num_turns == 1 and ep.total_reward == 1.0


def test_failed_episode_becomes_the_entity_lesson_quoting_the_question(tmp_path: Path) -> None:
    with MemoryBank(tmp_path / "b.sqlite", MemoryConfig(enabled=True, embeddings="lexical")) as bank:
        res = bank.record("qix:47=", [{"role": "user", "content": "qix:47="}, {"role": "assistant", "content": "1"}],
                          0.0, reference="58347", task_name=NAME, success=False)
        rec = bank.get(res.id)
        d = lesson_draft("qix", 583)
        assert (rec.situation, rec.instead) == (d.situation, d.instead)
        assert NAME in rec.tags and "entity:qix" in rec.tags and rec.example == "qix:47="
        got = bank.retrieve("qix:12=", tags=[NAME], count=False)
        assert reader("qix:12=", got.text) == "58312"
