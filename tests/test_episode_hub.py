"""EpisodeHub: groups handed out and collected whole, idle and stale episodes dropped and replayed, memory and
critique context, many threads at once."""

from __future__ import annotations

import threading

import pytest

from critique_rl.agents.episode_hub import EpisodeError, EpisodeHub, HubClosed
from critique_rl.agents.trajectory import Turn


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _turn(text: str) -> Turn:
    return Turn(observation="obs", obs_ids=[1, 2], action_ids=[3, 4], action_logprobs=[-0.1, -0.2],
                action_text=text, finished=True)


def _play_in_thread(hub, tasks, n, contexts=None):
    out: dict = {}

    def run():
        try:
            out["trajs"] = hub.play(tasks, n, contexts, poll_s=0.01)
        except Exception as exc:  # noqa: BLE001 - surfaced by the test
            out["error"] = exc

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, out


def test_groups_come_back_in_task_order_with_the_client_outcome():
    hub = EpisodeHub()
    tasks = [{"prompt": "a", "k": 0}, {"prompt": "b", "k": 1}]
    th, out = _play_in_thread(hub, tasks, 2)
    got = [hub.start(timeout=2) for _ in range(4)]
    assert [g["task"]["k"] for g in got] == [0, 0, 1, 1]
    assert got[0]["group_id"] == got[1]["group_id"] != got[2]["group_id"]
    assert hub.start(timeout=0.05) is None  # nothing left to hand out
    for j, g in enumerate(reversed(got)):  # finished in another order than handed out
        hub.live(g["episode_id"]).trajectory.turns.append(_turn(str(j)))
        assert hub.finish(g["episode_id"], reward=float(j % 2), feedback="too low" if j % 2 == 0 else None)["accepted"]
    th.join(5)
    trajs = out["trajs"]
    assert [t.task["k"] for t in trajs] == [0, 0, 1, 1]
    assert [t.total_reward for t in trajs] == [1.0, 0.0, 1.0, 0.0]
    assert [t.success for t in trajs] == [True, False, True, False]
    assert trajs[1].turns[-1].info["feedback"] == "too low" and "feedback" not in trajs[0].turns[-1].info
    assert all(t.done and t.stop_reason == "done" for t in trajs)
    with pytest.raises(EpisodeError) as e:
        hub.finish(got[0]["episode_id"], 1.0)
    assert e.value.status == 409 and "finished" in str(e.value)
    with pytest.raises(EpisodeError) as e:
        hub.live("ep-nope")
    assert e.value.status == 404


def test_an_idle_episode_is_dropped_and_its_slot_replayed_with_a_fresh_trajectory():
    clock = FakeClock()
    hub = EpisodeHub(idle_timeout=10, clock=clock)
    th, out = _play_in_thread(hub, [{"prompt": "a"}], 1)
    first = hub.start(timeout=2)
    hub.live(first["episode_id"]).trajectory.turns.append(_turn("half"))  # half an episode, then the client dies
    clock.t = 11.0
    second = hub.start(timeout=2)  # the slot comes back
    assert second is not None and second["episode_id"] != first["episode_id"]
    with pytest.raises(EpisodeError) as e:
        hub.finish(first["episode_id"], 1.0)
    assert e.value.status == 409 and "timed out" in str(e.value)
    hub.live(second["episode_id"]).trajectory.turns.append(_turn("whole"))
    hub.finish(second["episode_id"], 1.0)
    th.join(5)
    (traj,) = out["trajs"]
    assert [t.action_text for t in traj.turns] == ["whole"]
    st = hub.stats()
    assert st["dropped_timeout"] == 1 and st["finished"] == 1 and st["handed_out"] == 2


def test_an_episode_stopped_at_a_limit_keeps_that_stop_reason():
    hub = EpisodeHub()
    th, out = _play_in_thread(hub, [{"prompt": "a"}], 1)
    g = hub.start(timeout=2)
    ep = hub.live(g["episode_id"])
    ep.trajectory.turns.append(_turn("1"))
    ep.stopped = "max_turns"
    hub.finish(g["episode_id"], 0.0, success=False)
    th.join(5)
    (traj,) = out["trajs"]
    assert traj.stop_reason == "max_turns" and traj.done is False and traj.success is False


def test_a_busy_episode_is_not_reaped_and_cannot_be_finished_mid_call():
    clock = FakeClock()
    hub = EpisodeHub(idle_timeout=10, clock=clock)
    th, out = _play_in_thread(hub, [{"prompt": "a"}], 1)
    g = hub.start(timeout=2)
    ep = hub.live(g["episode_id"])
    ep.busy = True  # a call waits behind an optimizer step
    clock.t = 60.0
    assert hub.live(g["episode_id"]).state == "live"
    with pytest.raises(EpisodeError) as e:
        hub.finish(g["episode_id"], 1.0)
    assert e.value.status == 409 and "still being generated" in str(e.value)
    ep.busy = False
    hub.touch(g["episode_id"])
    assert hub.finish(g["episode_id"], 1.0)["accepted"]
    th.join(5)
    assert len(out["trajs"]) == 1


def test_touch_keeps_an_active_episode_alive():
    clock = FakeClock()
    hub = EpisodeHub(idle_timeout=10, clock=clock)
    th, out = _play_in_thread(hub, [{"prompt": "a"}], 1)
    g = hub.start(timeout=2)
    for t in (8.0, 16.0, 24.0):
        clock.t = t
        hub.touch(g["episode_id"])
    assert hub.live(g["episode_id"]).state == "live"
    hub.finish(g["episode_id"], 0.0)
    th.join(5)
    assert len(out["trajs"]) == 1


def test_an_episode_started_on_older_weights_is_dropped_beyond_max_staleness():
    hub = EpisodeHub(max_staleness=1)
    th, out = _play_in_thread(hub, [{"prompt": "a"}], 1)
    g = hub.start(timeout=2)
    hub.bump_version()
    hub.bump_version()  # two optimizer steps while it played: lag 2 > 1
    res = hub.finish(g["episode_id"], 1.0)
    assert res["accepted"] is False and "stale" in res["reason"]
    again = hub.start(timeout=2)
    assert again["policy_version"] == 2
    hub.bump_version()  # lag 1 <= 1: accepted
    assert hub.finish(again["episode_id"], 1.0)["accepted"]
    th.join(5)
    assert len(out["trajs"]) == 1 and hub.stats()["dropped_stale"] == 1


def test_context_puts_memory_first_and_the_critique_after_it_once():
    seen = []

    def context_fn(tasks, firsts):
        seen.append((tasks[0]["prompt"], firsts[0]))
        return [("Lesson: guess the middle.", ["rec-1"])]

    hub = EpisodeHub(context_fn=context_fn)
    th, out = _play_in_thread(hub, [{"prompt": "Guess 1 to 8."}], 1, contexts=["Turn 1: 2 is not the middle."])
    g = hub.start(timeout=2)
    text = hub.context(g["episode_id"], first_observation="Guess 1 to 8.")
    assert text == "Lesson: guess the middle.\n\nTurn 1: 2 is not the middle."
    assert hub.context(g["episode_id"], first_observation="other") == text and len(seen) == 1
    hub.finish(g["episode_id"], 0.0)
    th.join(5)
    (traj,) = out["trajs"]
    assert traj.memory_context == "Lesson: guess the middle." and traj.retrieved_ids == ["rec-1"]


def test_close_ends_a_waiting_batch_and_start():
    hub = EpisodeHub()
    th, out = _play_in_thread(hub, [{"prompt": "a"}], 2)
    g = hub.start(timeout=2)
    hub.close()
    th.join(5)
    assert isinstance(out["error"], HubClosed)
    assert hub.start(timeout=0.1) is None
    with pytest.raises(EpisodeError) as e:
        hub.live(g["episode_id"])
    assert e.value.status == 409 and "shutting down" in str(e.value)


def test_32_threads_play_64_episodes_none_lost_or_duplicated():
    hub = EpisodeHub()
    tasks = [{"prompt": f"t{i}", "i": i} for i in range(8)]
    th, out = _play_in_thread(hub, tasks, 8)
    seen: list[str] = []
    seen_lock = threading.Lock()

    def client():
        while True:
            g = hub.start(timeout=0.3)
            if g is None:
                return
            ep = hub.live(g["episode_id"])
            with ep.lock:
                ep.trajectory.turns.append(_turn(g["episode_id"]))
            hub.finish(g["episode_id"], reward=float(g["task"]["i"]))
            with seen_lock:
                seen.append(g["episode_id"])

    workers = [threading.Thread(target=client) for _ in range(32)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(20)
    th.join(5)
    trajs = out["trajs"]
    assert len(trajs) == 64 and len(set(seen)) == 64
    assert [t.total_reward for t in trajs] == [float(i // 8) for i in range(64)]
    assert sorted(t.turns[0].action_text for t in trajs) == sorted(seen)


def test_client_feedback_is_the_critique_and_the_env_critic_fills_in_without_it():
    from critique_rl.agents.guess import GuessCritic
    from critique_rl.agents.server_source import NO_FEEDBACK, ClientFeedbackCritic

    hub = EpisodeHub()
    th, out = _play_in_thread(hub, [{"prompt": "Guess my number from 1 to 8.", "target": 7}], 2)
    a, b = hub.start(timeout=2), hub.start(timeout=2)
    for g in (a, b):
        t = _turn("2")
        t.observation = "Guess my number from 1 to 8."
        hub.live(g["episode_id"]).trajectory.turns.append(t)
    hub.finish(a["episode_id"], 0.0, success=False, feedback="  The number was 7; you never went higher.  ")
    hub.finish(b["episode_id"], 0.0, success=False)
    th.join(5)
    with_fb, without = out["trajs"]
    crit = ClientFeedbackCritic(GuessCritic())
    c1, c2 = crit.critique_episodes([with_fb, without])
    assert c1.text == "The number was 7; you never went higher." and c1.kind == "feedback" and not c1.fallback
    assert c2.fallback and "is not the middle of 1 to 8" in c2.text
    assert crit.metrics() == {"critic/feedback_used": 1.0, "critic/feedback_missing": 1.0}
    (c3,) = ClientFeedbackCritic().critique_episodes([without])
    assert c3.text == NO_FEEDBACK and c3.fallback
