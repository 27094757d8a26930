"""Policy server reliability on real HTTP (127.0.0.1), the tiny model and the real ``openai`` client: 16 concurrent
agents, clients that vanish mid-episode, malformed requests, engine failures, two calls of one episode at once."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import openai
import pytest
from policy_server_helpers import (
    RecordingEngine,
    make_hub,
    play_guess,
    play_in_background,
    serving,
    tiny_policy,
)

from critique_rl.agents.client import EpisodeClient, ServerError
from critique_rl.agents.guess import make_tasks
from critique_rl.agents.runner import EpisodeLimits

LIMITS = EpisodeLimits(max_turns=4, max_new_tokens=6)


@pytest.fixture(scope="module")
def policy():
    return tiny_policy()


def test_16_concurrent_agents_no_lost_or_duplicated_episode_and_exact_tokens(policy):
    engine = RecordingEngine(policy.engine)
    hub = make_hub(policy, LIMITS, engine=engine)
    tasks = make_tasks("concurrent", 4, seed=5)
    ids_out: list[str] = []
    played_by: dict[str, list[str]] = {}
    errors: list[BaseException] = []
    with serving(hub, batch_wait_ms=20) as server:
        played = play_in_background(hub, tasks, n=4, ids_out=ids_out)  # 16 episodes, sampled at temperature 1
        barrier = threading.Barrier(16)

        def agent() -> None:
            try:
                ec = EpisodeClient(server.base_url)
                llm = openai.OpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0)
                barrier.wait(timeout=30)
                while (ep := ec.next_task(timeout=0.5)) is not None:
                    def chat(messages, eid=ep.episode_id):
                        return llm.chat.completions.create(model="m", messages=messages,
                                                           extra_headers={"X-Episode-Id": eid}).choices[0].message.content
                    replies, ret, success = play_guess(chat, ep.task)
                    assert ep.episode_id not in played_by
                    played_by[ep.episode_id] = replies
                    assert ec.finish(ep.episode_id, ret, success)["accepted"]
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=agent) for _ in range(16)]
        for t in threads:
            t.start()
        trajs = played.join(timeout=120)
        for t in threads:
            t.join(timeout=30)
        stats = EpisodeClient(server.base_url).stats()
    assert not errors, errors[:3]
    assert len(trajs) == 16 and len(ids_out) == 16 and len(set(ids_out)) == 16
    assert sorted(played_by) == sorted(ids_out)  # every handed-out episode played once and returned once
    assert stats["handed_out"] == 16 and stats["finished"] == 16 and stats["in_flight"] == 0
    for i, traj in enumerate(trajs):
        assert traj.task is tasks[i // 4] or traj.task == tasks[i // 4]  # groups of 4 contiguous, as the runner
    # every recorded turn is exactly one engine row: same context ids in, same ids and log-probs out
    rows: dict[tuple[int, ...], list] = {}
    for prompt, completion in engine.rows:
        rows.setdefault(prompt, []).append(completion)
    total_turns = 0
    for eid, traj in zip(ids_out, trajs, strict=True):
        assert [t.action_text for t in traj.turns] == played_by[eid]
        full, comp_start = traj.token_ids(), len(traj.prompt_ids)
        for turn, (start, end) in zip(traj.turns, traj.action_spans(), strict=True):
            context = tuple(full[: comp_start + start])
            match = [c for c in rows.get(context, []) if c.token_ids == turn.action_ids]
            assert match, f"{eid}: a recorded action was not generated from its context"
            assert match[0].logprobs == turn.action_logprobs
            assert full[comp_start + start: comp_start + end] == turn.action_ids
            total_turns += 1
    assert len(engine.rows) == total_turns  # nothing generated that is not in an episode, nothing lost
    assert max(engine.batch_sizes) > 1 and len(engine.batch_sizes) < total_turns  # calls were batched
    assert stats["server"]["mean_batch"] > 1


def _raw_chat(port: int, body: dict, episode_id: str) -> None:
    """Send a chat call and close the socket without reading the reply (a client killed mid-call)."""
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"X-Episode-Id: {episode_id}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)


def test_a_client_that_disappears_mid_episode_is_dropped_and_never_trained_on(policy):
    hub = make_hub(policy, LIMITS, idle_timeout=1.0)  # long enough for a busy machine, short for a test
    tasks = make_tasks("vanish", 2, seed=6)
    ids_out: list[str] = []
    with serving(hub) as server:
        played = play_in_background(hub, tasks, n=1, ids_out=ids_out)
        ec = EpisodeClient(server.base_url)
        gone = ec.next_task(timeout=5)
        first = [{"role": "user", "content": gone.task["prompt"]}]
        reply = ec.chat(gone.episode_id, first)  # one whole turn ...
        gone_traj = hub.live(gone.episode_id).trajectory
        _raw_chat(server.port, {"model": "m", "messages": first + [  # ... then killed in the middle of a call
            {"role": "assistant", "content": reply}, {"role": "user", "content": "Higher."}]}, gone.episode_id)
        deadline = time.monotonic() + 5
        while gone_traj.num_turns < 2 and time.monotonic() < deadline:
            time.sleep(0.02)  # the server still generates and records the call whose client is gone
        for _ in range(2):  # the other episode, then the vanished one's slot handed out again after the timeout
            ep = ec.next_task(timeout=5)
            replies, ret, success = play_guess(lambda m, e=ep.episode_id: ec.chat(e, m), ep.task)
            ec.finish(ep.episode_id, ret, success)
        trajs = played.join(timeout=30)
        with pytest.raises(ServerError) as late:
            ec.chat(gone.episode_id, first)
        assert late.value.status == 409 and "timed out" in late.value.message
        with pytest.raises(ServerError) as late_finish:
            ec.finish(gone.episode_id, 1.0, True)
        assert late_finish.value.status == 409
        stats = ec.stats()
    assert gone.episode_id not in ids_out and len(trajs) == 2
    assert all(t is not gone_traj for t in trajs)  # the half episode is never returned for training
    assert sorted(t.task["target"] for t in trajs) == sorted(t["target"] for t in tasks)
    assert stats["dropped_timeout"] == 1 and stats["finished"] == 2 and stats["handed_out"] == 3


MALFORMED = [
    (b"{not json", {}, 400, "invalid_json"),
    (b"[1, 2]", {}, 400, "invalid_json"),
    (b'{"model": "m", "messages": "hi"}', {}, 400, None),
    (b'{"model": "m", "messages": [{"role": "robot", "content": "x"}]}', {}, 400, None),
    (b'{"model": "m", "messages": [{"role": "user", "content": 5}]}', {}, 400, None),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', {}, 400, None),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 3}', {}, 400, None),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', {}, 400, None),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}', {}, 400, None),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}]}', {"X-Episode-Id": "ep-missing"}, 404,
     None),
]


def test_malformed_requests_get_one_json_error_and_the_server_keeps_serving(policy):
    hub = make_hub(policy, LIMITS)
    good = json.dumps({"model": "m", "messages": [{"role": "user", "content": "Guess my number."}],
                       "max_tokens": 3}).encode()
    with serving(hub) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        for body, headers, status, code in MALFORMED:  # all on one keep-alive connection
            conn.request("POST", "/v1/chat/completions", body=body,
                         headers={"Content-Type": "application/json", **headers})
            resp = conn.getresponse()
            err = json.loads(resp.read())["error"]
            assert resp.status == status, (body, err)
            assert isinstance(err["message"], str) and err["message"] and err["type"]
            if code:
                assert err["code"] == code
            conn.request("POST", "/v1/chat/completions", body=good, headers={"Content-Type": "application/json"})
            ok = conn.getresponse()
            assert ok.status == 200 and json.loads(ok.read())["choices"][0]["message"]["role"] == "assistant"
        for method, path, status in (("GET", "/v1/chat/completions", 405), ("POST", "/v1/nothing", 404),
                                     ("PATCH", "/v1/models", 501), ("GET", "/v1/models", 200)):
            conn.request(method, path, body=b"{}" if method == "POST" else None)
            resp = conn.getresponse()
            payload = json.loads(resp.read())
            assert resp.status == status and (status == 200 or payload["error"]["message"])
            if resp.will_close:  # http.server's own errors (unsupported method) close the connection
                conn.close()
        conn.close()
        big = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        big.putrequest("POST", "/v1/chat/completions")
        big.putheader("Content-Length", str(1 << 30))
        big.endheaders()
        resp = big.getresponse()
        assert resp.status == 413 and "over the limit" in json.loads(resp.read())["error"]["message"]
        big.close()
        llm = openai.OpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0)
        assert llm.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=2).choices[0].message.role == "assistant"
        assert EpisodeClient(server.base_url).stats()["server"]["errors"] == len(MALFORMED) + 4


class FlakyEngine(RecordingEngine):
    """Fails its first call (an engine error), then works."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.failures = 1

    def generate_ids(self, prompt_ids, params):
        if self.failures:
            self.failures -= 1
            raise RuntimeError("CUDA out of memory (simulated)")
        return super().generate_ids(prompt_ids, params)


class GatedEngine(RecordingEngine):
    """Blocks inside the engine call until released (a slow generation)."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.entered = threading.Event()
        self.release = threading.Event()

    def generate_ids(self, prompt_ids, params):
        self.entered.set()
        assert self.release.wait(timeout=30)
        return super().generate_ids(prompt_ids, params)


def test_an_engine_error_is_one_500_and_the_episode_can_retry(policy):
    engine = FlakyEngine(policy.engine)
    hub = make_hub(policy, LIMITS, engine=engine)
    task = make_tasks("flaky", 1, seed=7)[0]
    with serving(hub) as server:
        play_in_background(hub, [task], n=1)
        ec = EpisodeClient(server.base_url)
        ep = ec.next_task(timeout=5)
        msgs = [{"role": "user", "content": task["prompt"]}]
        with pytest.raises(ServerError) as failed:
            ec.chat(ep.episode_id, msgs)
        assert failed.value.status == 500 and "out of memory" in failed.value.message
        assert hub.live(ep.episode_id).trajectory.num_turns == 0  # nothing recorded for the failed call
        reply = ec.chat(ep.episode_id, msgs)  # the same call again works and records one turn
        turns = hub.live(ep.episode_id).trajectory.turns
        assert len(turns) == 1 and turns[0].action_text == reply


def test_two_calls_of_one_episode_at_once_the_second_is_refused(policy):
    engine = GatedEngine(policy.engine)
    hub = make_hub(policy, LIMITS, engine=engine)
    task = make_tasks("busy", 1, seed=8)[0]
    with serving(hub) as server:
        play_in_background(hub, [task], n=1)
        ec = EpisodeClient(server.base_url)
        ep = ec.next_task(timeout=5)
        msgs = [{"role": "user", "content": task["prompt"]}]
        first: list[str] = []
        t = threading.Thread(target=lambda: first.append(ec.chat(ep.episode_id, msgs)))
        t.start()
        assert engine.entered.wait(timeout=10)
        with pytest.raises(ServerError) as busy:
            ec.chat(ep.episode_id, msgs)
        assert busy.value.status == 409 and "in flight" in busy.value.message
        engine.release.set()
        t.join(timeout=30)
        live = hub.live(ep.episode_id)
        assert first and live.trajectory.num_turns == 1 and live.messages[-1]["content"] == first[0]
        assert len(engine.rows) == 1


def test_finish_while_a_call_is_generating_never_adds_a_turn_to_a_finished_episode(policy):
    """A client that finishes without waiting for its reply: either the finish is refused (409) and the call's turn
    is recorded, or the finish wins and the call's reply is refused (409); the trajectory handed to training never
    changes after it was finished."""
    engine = GatedEngine(policy.engine)
    hub = make_hub(policy, LIMITS, engine=engine)
    task = make_tasks("race", 1, seed=10)[0]
    with serving(hub) as server:
        played = play_in_background(hub, [task], n=1)
        ec = EpisodeClient(server.base_url)
        ep = ec.next_task(timeout=5)
        msgs = [{"role": "user", "content": task["prompt"]}]
        call: list = []

        def chat() -> None:
            try:
                call.append(ec.chat(ep.episode_id, msgs))
            except ServerError as exc:
                call.append(exc)

        t = threading.Thread(target=chat)
        t.start()
        assert engine.entered.wait(timeout=10)
        try:
            finished_first = ec.finish(ep.episode_id, 0.0, False)["accepted"]
        except ServerError as exc:
            assert exc.status == 409
            finished_first = False
        engine.release.set()
        t.join(timeout=30)
        if finished_first:
            assert isinstance(call[0], ServerError) and call[0].status == 409
            (traj,) = played.join()
            assert traj.num_turns == 0
        else:
            assert isinstance(call[0], str)
            ec.finish(ep.episode_id, 0.0, False)
            (traj,) = played.join()
            assert traj.num_turns == 1 and traj.turns[0].action_text == call[0]
        turns_at_finish = traj.num_turns
        time.sleep(0.05)
        assert traj.num_turns == turns_at_finish
