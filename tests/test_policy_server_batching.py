"""When the policy server's engine thread runs a batch (real HTTP on 127.0.0.1, the tiny model): at once when every
episode in flight has its call queued, waiting within the window for an agent that finished an episode and is
coming back for the next one, and never again for one that did not come back."""

from __future__ import annotations

import http.client
import json
import threading
import time

import pytest
from policy_server_helpers import RecordingEngine, make_hub, play_in_background, serving, tiny_policy

from critique_rl.agents.client import EpisodeClient
from critique_rl.agents.episode_hub import HubClosed
from critique_rl.agents.guess import make_tasks
from critique_rl.agents.runner import EpisodeLimits

LIMITS = EpisodeLimits(max_turns=6, max_new_tokens=4)


@pytest.fixture(scope="module")
def policy():
    return tiny_policy()


class Agent:
    """One keep-alive connection playing episodes turn by turn (fixed observations, no env)."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.episode_id = ""
        self.messages: list[dict[str, str]] = []

    def post(self, path: str, body: dict, headers: dict | None = None) -> tuple[int, dict | None]:
        self.conn.request("POST", path, body=json.dumps(body),
                          headers={"Content-Type": "application/json", **(headers or {})})
        resp = self.conn.getresponse()
        raw = resp.read()
        return resp.status, (json.loads(raw) if raw else None)

    def start(self) -> bool:
        status, ep = self.post("/v1/episodes/start", {"timeout": 0.2})
        if status != 200:
            return False
        assert ep is not None
        self.episode_id, self.messages = ep["episode_id"], [{"role": "user", "content": ep["task"]["prompt"]}]
        return True

    def chat(self) -> float:
        """One turn; the seconds it took."""
        t0 = time.perf_counter()
        status, reply = self.post("/v1/chat/completions", {"model": "m", "messages": self.messages},
                                  {"X-Episode-Id": self.episode_id})
        assert status == 200, reply
        assert reply is not None
        self.messages += [{"role": "assistant", "content": reply["choices"][0]["message"]["content"]},
                          {"role": "user", "content": "Higher."}]
        return time.perf_counter() - t0

    def finish(self) -> None:
        status, got = self.post(f"/v1/episodes/{self.episode_id}/finish", {"reward": 0.0})
        assert status == 200 and got is not None and got["accepted"], got


def test_a_lockstep_wave_runs_as_one_batch_at_once_not_after_the_window(policy):
    engine = RecordingEngine(policy.engine)
    hub = make_hub(policy, LIMITS, engine=engine)
    with serving(hub, batch_wait_ms=5000, batch_wait_fraction=0.0) as server:  # a window no test could sit out
        played = play_in_background(hub, make_tasks("wave", 4, seed=1))
        agents = [Agent(server.port) for _ in range(4)]
        assert all(a.start() for a in agents)
        t0 = time.perf_counter()
        for _turn in range(3):  # lock-step: each round's 4 calls are sent together
            threads = [threading.Thread(target=a.chat) for a in agents]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=30)
        elapsed = time.perf_counter() - t0
        for a in agents:
            a.finish()
        played.join()
    assert engine.batch_sizes == [4, 4, 4]  # every round one engine call ...
    assert elapsed < 4.0  # ... run as soon as its last call came (a 5 s window sat out 3 times would be 15 s)


def test_an_agent_coming_back_for_its_next_episode_joins_the_batch(policy):
    engine = RecordingEngine(policy.engine)
    hub = make_hub(policy, LIMITS, engine=engine)
    with serving(hub, batch_wait_ms=3000, batch_wait_fraction=0.0) as server:
        played = play_in_background(hub, make_tasks("back", 3, seed=2))
        a, b = Agent(server.port), Agent(server.port)
        assert a.start() and b.start()
        both = [threading.Thread(target=x.chat) for x in (a, b)]
        for t in both:
            t.start()
        for t in both:
            t.join(timeout=30)
        a.finish()  # a third episode is queued: a is expected back

        def a_returns() -> None:
            time.sleep(0.4)  # the agent's own work between episodes
            assert a.start()
            a.chat()

        back = threading.Thread(target=a_returns)
        back.start()
        waited = b.chat()  # b's call waits for a's first call of its next episode, then both run together
        back.join(timeout=30)
        a.finish()
        b.finish()
        played.join()
    assert engine.batch_sizes == [2, 2]  # without waiting for a: [2, 1, 1]
    assert 0.35 < waited < 2.5  # waited for a (0.4 s), not the whole 3 s window


def test_an_agent_that_does_not_come_back_delays_one_batch_by_the_window_only(policy):
    engine = RecordingEngine(policy.engine)
    hub = make_hub(policy, LIMITS, engine=engine)
    with serving(hub, batch_wait_ms=800, batch_wait_fraction=0.0) as server:
        played = play_in_background(hub, make_tasks("gone", 3, seed=3))
        a, b = Agent(server.port), Agent(server.port)
        assert a.start() and b.start()
        both = [threading.Thread(target=x.chat) for x in (a, b)]
        for t in both:
            t.start()
        for t in both:
            t.join(timeout=30)
        a.finish()  # an episode is still queued, but a never asks for it
        first = b.chat()  # waits the window for a, once
        second = b.chat()  # a is no longer expected: runs at once
        b.finish()
        hub.close()  # the third episode is never played
        with pytest.raises(HubClosed):
            played.join()
    assert engine.batch_sizes == [2, 1, 1]
    assert 0.7 < first < 3.0
    assert second < 0.6


def test_16_agents_with_a_long_window_never_sit_it_out_and_lose_nothing(policy):
    engine = RecordingEngine(policy.engine)
    hub = make_hub(policy, LIMITS, engine=engine)
    window = 3.0
    ids_out: list[str] = []
    errors: list[BaseException] = []
    turns_of: dict[str, int] = {}
    lock = threading.Lock()
    with serving(hub, batch_wait_ms=1000 * window, batch_wait_fraction=0.0, record_batches=True) as server:
        played = play_in_background(hub, make_tasks("many", 8, seed=4), n=4, ids_out=ids_out)  # 32 episodes

        def run(k: int) -> None:
            try:
                agent = Agent(server.port)
                while agent.start():
                    turns = 1 + (k + len(turns_of)) % 3  # episodes of 1-3 turns: agents fall out of step
                    for _ in range(turns):
                        agent.chat()
                    with lock:
                        assert agent.episode_id not in turns_of
                        turns_of[agent.episode_id] = turns
                    agent.finish()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(k,)) for k in range(16)]
        for t in threads:
            t.start()
        trajs = played.join(timeout=120)
        for t in threads:
            t.join(timeout=30)
        stats = EpisodeClient(server.base_url).stats()
        timeline = list(server.batcher.timeline or [])
    assert not errors, errors[:3]
    assert len(trajs) == 32 and sorted(ids_out) == sorted(turns_of)  # each episode played once, returned once
    assert stats["finished"] == 32 and stats["in_flight"] == 0
    assert [t.num_turns for t in trajs] == [turns_of[e] for e in ids_out]
    rows: dict[tuple[int, ...], list] = {}
    for prompt, completion in engine.rows:
        rows.setdefault(prompt, []).append(completion)
    for traj in trajs:  # every recorded action is exactly an engine row generated from its context
        full, comp_start = traj.token_ids(), len(traj.prompt_ids)
        for turn, (start, _end) in zip(traj.turns, traj.action_spans(), strict=True):
            assert any(c.token_ids == turn.action_ids and c.logprobs == turn.action_logprobs
                       for c in rows.get(tuple(full[: comp_start + start]), []))
    assert len(engine.rows) == sum(turns_of.values())
    # no batch sat out the window: each ran once its calls were in (or every agent was accounted for)
    assert timeline and max(b.dispatched - b.first_queued for b in timeline) < window / 2
    assert max(engine.batch_sizes) > 4
