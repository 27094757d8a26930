"""Memory inside the agent loop: retrieval at reset (task + first observation), record after, helped credit."""

from __future__ import annotations

from critique_rl.agents.guess import GuessCritic
from critique_rl.agents.memory import EpisodeMemory, retrieval_query
from critique_rl.agents.trajectory import Trajectory, Turn
from critique_rl.config import MemoryConfig
from critique_rl.memory import MemoryBank


def episode(actions, success, obs0="Guess my number from 1 to 8.", target=3):
    t = Trajectory(task={"prompt": obs0, "answer": str(target), "target": target})
    obs = [obs0, "Lower. It is from 1 to 3.", "Higher. It is from 3 to 3."]
    for o, a in zip(obs, actions, strict=False):
        t.turns.append(Turn(o, [], [], [], a, True))
    t.success, t.done = success, True
    t.final_observation = "Correct!" if success else f"Out of guesses. It was {target}."
    return t


def test_record_then_retrieve_then_credit(tmp_path):
    bank = MemoryBank(tmp_path / "b.sqlite", config=MemoryConfig(embeddings="lexical", top_k_demos=1,
                                                                 top_k_lessons=1, token_budget=300))
    mem = EpisodeMemory(bank, "guess_number", run_name="t")
    good, bad = episode(["4", "2", "3"], True), episode(["2", "1", "2"], False)
    crit = GuessCritic().critique_episodes([bad])[0].text
    m = mem.record([good, bad], [None, crit], step=1, group_size=2)
    assert (m["memory/demonstrations"], m["memory/lessons"]) == (1.0, 1.0)
    [demo] = [r for r in bank.list() if r.kind == "demonstration"]
    assert "assistant: 4" in demo.trajectory and "user: Lower. It is from 1 to 3." in demo.trajectory
    [lesson] = [r for r in bank.list() if r.kind == "lesson"]
    assert "guess the middle of the range" in lesson.instead.lower()
    # retrieval at reset reads task + first observation, one call per distinct query
    [(text, ids)] = mem.context_fn([{"prompt": "Guess my number from 1 to 8."}], ["Guess my number from 1 to 8."])
    assert "Lessons from earlier mistakes" in text and set(ids) == {demo.id, lesson.id}
    assert retrieval_query({"prompt": "p"}, "obs") == "p\nobs" and retrieval_query({"prompt": "p"}, "p") == "p"
    # credit: per episode that saw the records; helped only when it succeeded
    seen_ok, seen_bad = episode(["4", "2", "3"], True), episode(["1", "1", "1"], False)
    seen_ok.retrieved_ids = seen_bad.retrieved_ids = ids
    m = mem.record([seen_ok, seen_bad], step=2, group_size=2)
    assert m["memory/context_rate"] == 1.0 and m["memory/hit_success_rate"] == 0.5
    got = {r.id: (r.retrieved, r.helped) for r in bank.list()}
    assert got[demo.id] == (2, 1) and got[lesson.id] == (2, 1)
    bank.close()


def test_bank_api_takes_trajectory_messages(tmp_path):
    """The same bank in anyone's loop: context_for before, record(messages) after."""
    bank = MemoryBank(tmp_path / "c.sqlite", config=MemoryConfig(embeddings="lexical"))
    assert bank.context_for("Guess my number from 1 to 8.") == ""
    t = episode(["4", "2", "3"], True)
    r = bank.record(task=t.task["prompt"], trajectory=t.messages(), reward=1.0, success=True)
    assert r.kind == "demonstration" and r.action == "new"
    assert "assistant: 3" in bank.context_for("Guess my number from 1 to 8.")
    bank.close()
