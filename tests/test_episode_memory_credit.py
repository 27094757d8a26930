"""EpisodeMemory (the agent loop's memory) credits ``lift`` as the trainer's MemoryHook does, and honours
``memory.min_score`` at reset."""

from __future__ import annotations

from test_agents_memory import episode

from critique_rl.agents.guess import GuessCritic
from critique_rl.agents.memory import EpisodeMemory
from critique_rl.config import MemoryConfig
from critique_rl.memory import MemoryBank


def _lift(bank: MemoryBank) -> dict[str, tuple[int, int, float]]:
    rows = bank.store.read(lambda c: c.execute("SELECT id, retrieved, helped, lift FROM records").fetchall())
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def test_record_credits_lift_against_the_steps_mean_success(tmp_path):
    bank = MemoryBank(tmp_path / "b.sqlite", config=MemoryConfig(embeddings="lexical"))
    mem = EpisodeMemory(bank, "guess_number", run_name="t")
    good, bad = episode(["4", "2", "3"], True), episode(["2", "1", "2"], False)
    mem.record([good, bad], [None, GuessCritic().critique_episodes([bad])[0].text], step=1, group_size=2)
    [a] = [r.id for r in bank.list() if r.kind == "demonstration"]
    [b] = [r.id for r in bank.list() if r.kind == "lesson"]
    saw_a, saw_b = episode(["4", "2", "3"], True), episode(["1", "1", "1"], False)
    saw_a.retrieved_ids, saw_b.retrieved_ids = [a], [b]
    m = mem.record([saw_a, saw_b], step=2, group_size=2)
    assert m["memory/credit_baseline"] == 0.5
    got = _lift(bank)
    assert got[a] == (1, 1, 0.5) and got[b] == (1, 0, -0.5)  # 1 - 0.5 and 0 - 0.5
    bank.close()


def test_min_score_drops_records_that_match_no_word_of_the_task(tmp_path):
    bank = MemoryBank(tmp_path / "c.sqlite", config=MemoryConfig(embeddings="lexical", top_k_demos=1,
                                                                 top_k_lessons=1, token_budget=300))
    EpisodeMemory(bank, "guess_number").record([episode(["4", "2", "3"], True)], step=1)
    task, unrelated = {"prompt": "Guess my number from 1 to 8."}, {"prompt": "zebra quartz"}
    plain = EpisodeMemory(bank, "guess_number")
    strict = EpisodeMemory(bank, "guess_number", min_score=0.0)
    assert plain.context_fn([unrelated], ["zebra quartz"])[0][1]  # the bank's top-up fills the context
    assert strict.context_fn([unrelated], ["zebra quartz"]) == [("", [])]
    text, ids = strict.context_fn([task], [task["prompt"]])[0]
    assert ids and text  # a matching record stays
    bank.close()
