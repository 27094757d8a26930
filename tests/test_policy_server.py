"""The policy server over real HTTP on 127.0.0.1, the real tiny model and tokenizer, the real ``openai`` client:
episodes recorded token for token as the in-process runner builds them, the history rule, ids, auth, endpoints."""

from __future__ import annotations

import openai
import pytest
import torch
from policy_server_helpers import make_hub, play_guess, play_in_background, serving, tiny_policy

from critique_rl.agents.client import EpisodeClient, ServerError
from critique_rl.agents.guess import GuessNumberEnv, make_tasks
from critique_rl.agents.runner import EpisodeLimits, run_episodes
from critique_rl.agents.server import PolicyServer, ServeOptions
from critique_rl.errors import UserError

LIMITS = EpisodeLimits(max_turns=4, max_new_tokens=6)
MEMORY = "Lesson: guess the middle of the range."


def memory_fn(tasks, observations):
    return [(MEMORY, ["lesson-1"]) for _ in tasks]


@pytest.fixture(scope="module")
def policy():
    return tiny_policy()


def openai_chat(llm, **kw):
    def chat(messages):
        return llm.chat.completions.create(model="tiny-policy", messages=messages, **kw).choices[0].message.content
    return chat


def assert_same_episode(got, ref):
    assert got.num_turns == ref.num_turns >= 1
    for a, b in zip(got.turns, ref.turns, strict=True):
        assert a.observation == b.observation
        assert a.obs_ids == b.obs_ids
        assert a.action_ids == b.action_ids
        assert a.action_logprobs == b.action_logprobs
        assert a.action_text == b.action_text
        assert a.finished == b.finished
        assert a.reward == b.reward
    assert got.token_ids() == ref.token_ids()
    assert got.action_mask() == ref.action_mask()
    assert got.sampling_logprobs() == ref.sampling_logprobs()
    assert got.context == ref.context and got.memory_context == ref.memory_context
    assert got.retrieved_ids == ref.retrieved_ids
    assert got.success == ref.success


@pytest.mark.parametrize("greedy", [True, False])
def test_recorded_episode_equals_the_in_process_runner(policy, greedy):
    """Same task, same memory, same random draws: the trajectory built from the HTTP calls is the runner's."""
    tasks = make_tasks("server", 3, seed=1)
    refs, gots = [], []
    for task in tasks:
        torch.manual_seed(11)
        refs.append(run_episodes(policy.engine, policy.renderer, GuessNumberEnv, [task], n=1, limits=LIMITS,
                                 greedy=greedy, temperature=1.0, context_fn=memory_fn)[0])
    hub = make_hub(policy, LIMITS, context_fn=memory_fn)
    with serving(hub) as server:
        played = play_in_background(hub, tasks, n=1, greedy=greedy)
        client = EpisodeClient(server.base_url)
        for _ in tasks:
            ep = client.next_task(timeout=10)
            torch.manual_seed(11)
            # the request's temperature is ignored for recorded episodes (they sample at the training settings)
            chat = openai_chat(client.openai(ep.episode_id), max_tokens=6, temperature=0.0)
            replies, ret, success = play_guess(chat, ep.task)
            assert client.finish(ep.episode_id, ret, success)["accepted"]
        gots = played.join()
    assert len(gots) == 3
    for got, ref in zip(gots, refs, strict=True):
        assert_same_episode(got, ref)
    assert sum(t.num_turns for t in gots) > 3  # multi-turn episodes were compared, not only first prompts


def test_client_system_message_goes_first_and_is_part_of_the_plain_context(policy):
    hub = make_hub(policy, LIMITS, context_fn=memory_fn)
    task = make_tasks("server", 1, seed=2)[0]
    with serving(hub) as server:
        played = play_in_background(hub, [task], n=1, greedy=True)
        client = EpisodeClient(server.base_url)
        ep = client.next_task(timeout=10)
        replies, ret, success = play_guess(lambda m: client.chat(ep.episode_id, m), ep.task, system="Be brief.")
        client.finish(ep.episode_id, ret, success)
        (got,) = played.join()
    assert got.context == "Be brief.\n\n" + MEMORY
    assert got.memory_context == "Be brief.\n\n" + MEMORY  # the plain context refinements are trained under
    assert got.turns[0].obs_ids == policy.renderer.first(task["prompt"], "Be brief.\n\n" + MEMORY)
    assert [t.action_text for t in got.turns] == replies


def test_history_must_extend_the_recorded_episode(policy):
    hub = make_hub(policy, LIMITS)
    task = make_tasks("server", 1, seed=3)[0]
    with serving(hub) as server:
        play_in_background(hub, [task], n=1, greedy=True)
        client = EpisodeClient(server.base_url)
        ep = client.next_task(timeout=10)
        first = [{"role": "user", "content": task["prompt"]}]
        reply = client.chat(ep.episode_id, first)
        good = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "Higher."}]
        edited = first + [{"role": "assistant", "content": reply + " (edited)"}, {"role": "user", "content": "Higher."}]
        with pytest.raises(ServerError) as bad:
            client.chat(ep.episode_id, edited)
        assert bad.value.status == 400 and bad.value.code == "history_mismatch"
        assert "messages[1]" in bad.value.message and "expected assistant" in bad.value.message
        with pytest.raises(ServerError, match=r"messages\[1\]") as short:  # the reply left out
            client.chat(ep.episode_id, first)
        assert short.value.status == 400
        with pytest.raises(ServerError, match="assistant message the server did not write"):
            client.chat(ep.episode_id, good + [{"role": "assistant", "content": "4"}])
        with pytest.raises(ServerError, match=r"messages\[0\]"):
            client.chat(ep.episode_id, [{"role": "user", "content": "another task"}] + good[1:])
        client.chat(ep.episode_id, good)  # the refused calls changed nothing: the right history still works
        live = hub.live(ep.episode_id)
        assert live.trajectory.num_turns == 2 and live.messages[:3] == good


def test_episode_ids_unknown_finished_and_conflicting(policy):
    hub = make_hub(policy, LIMITS)
    task = make_tasks("server", 1, seed=4)[0]
    msgs = [{"role": "user", "content": task["prompt"]}]
    with serving(hub) as server:
        play_in_background(hub, [task], n=1)
        client = EpisodeClient(server.base_url)
        llm = client.openai("ep-nope")
        with pytest.raises(openai.NotFoundError, match="unknown episode id 'ep-nope'"):
            llm.chat.completions.create(model="m", messages=msgs)
        ep = client.next_task(timeout=10)
        plain = client.openai(None)
        # the id from the body's metadata or user field works as the header does
        plain.chat.completions.create(model="m", messages=msgs, metadata={"episode_id": ep.episode_id})
        assert hub.live(ep.episode_id).trajectory.num_turns == 1
        with pytest.raises(openai.BadRequestError, match="differs between"):
            client.openai(ep.episode_id).chat.completions.create(model="m", messages=msgs, user="ep-other")
        client.finish(ep.episode_id, 0.0, False)
        calls = client.stats()["server"]["chat_calls"]
        with pytest.raises(openai.ConflictError, match="finished"):
            plain.chat.completions.create(model="m", messages=msgs, user=ep.episode_id)
        assert client.stats()["server"]["chat_calls"] == calls + 1  # x-should-retry: false, the client does not retry
        with pytest.raises(ServerError) as again:
            client.finish(ep.episode_id, 1.0)
        assert again.value.status == 409
        with pytest.raises(ServerError) as bad_reward:
            client.finish("ep-nope", "high")  # type: ignore[arg-type]
        assert bad_reward.value.status == 400 and "reward" in bad_reward.value.message


def test_bearer_token_is_enforced_and_read_from_the_environment(policy, monkeypatch):
    hub = make_hub(policy, LIMITS)
    monkeypatch.delenv("POLICY_TOKEN_T", raising=False)
    with pytest.raises(UserError, match="POLICY_TOKEN_T"):
        PolicyServer(hub, ServeOptions(port=0, api_key_env="POLICY_TOKEN_T"))
    monkeypatch.setenv("POLICY_TOKEN_T", "s3cret-token")
    msgs = [{"role": "user", "content": "Guess my number from 1 to 16."}]
    with serving(hub, api_key_env="POLICY_TOKEN_T") as server:
        assert "s3cret" not in repr(EpisodeClient(server.base_url, api_key="s3cret-token"))
        for key in ("wrong", None):
            with pytest.raises(ServerError) as denied:
                EpisodeClient(server.base_url, api_key=key).stats()
            assert denied.value.status == 401 and "s3cret" not in denied.value.message
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.base_url, api_key="wrong").chat.completions.create(model="m", messages=msgs)
        ok = openai.OpenAI(base_url=server.base_url, api_key="s3cret-token")
        assert ok.chat.completions.create(model="m", messages=msgs, max_tokens=3).usage.completion_tokens >= 1
        assert EpisodeClient(server.base_url, api_key="s3cret-token").stats()["server"]["errors"] == 3


def test_models_completions_streaming_logprobs_and_plain_calls(policy):
    hub = make_hub(policy, LIMITS)
    task = make_tasks("server", 1, seed=5)[0]
    msgs = [{"role": "user", "content": task["prompt"]}]
    with serving(hub) as server:
        play_in_background(hub, [task], n=1, greedy=True)
        client = EpisodeClient(server.base_url)
        plain = client.openai(None)
        assert [m.id for m in plain.models.list().data] == ["tiny-policy"]
        text = plain.completions.create(model="tiny-policy", prompt="U: Guess my number", max_tokens=4)
        assert text.usage.completion_tokens >= 1 and text.choices[0].finish_reason in ("stop", "length")
        reply = plain.chat.completions.create(model="m", messages=msgs, temperature=0.0, max_tokens=6)
        assert reply.usage.completion_tokens <= 6
        assert client.stats()["server"]["recorded_calls"] == 0  # no episode id: served, not recorded
        ep = client.next_task(timeout=10)
        llm = client.openai(ep.episode_id)
        chunks = list(llm.chat.completions.create(model="m", messages=msgs, stream=True, logprobs=True,
                                                  stream_options={"include_usage": True}))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        turn = hub.live(ep.episode_id).trajectory.turns[0]
        assert streamed == turn.action_text
        assert [x.logprob for x in chunks[0].choices[0].logprobs.content] == turn.action_logprobs
        assert chunks[-1].usage.completion_tokens == len(turn.action_ids)
        # greedy plain call == greedy episode call on the same prompt (same engine, same ids)
        assert reply.choices[0].message.content == turn.action_text
        with pytest.raises(openai.BadRequestError, match="above the server's limit of 6"):
            llm.chat.completions.create(model="m", messages=msgs + [{"role": "assistant", "content": streamed},
                                                                    {"role": "user", "content": "Higher."}],
                                        max_tokens=7)
        with pytest.raises(openai.BadRequestError, match="temperature"):
            plain.chat.completions.create(model="m", messages=msgs, temperature=5.0)
        with pytest.raises(openai.BadRequestError, match="tools are not supported"):
            plain.chat.completions.create(model="m", messages=msgs, tools=[{"type": "function", "function": {
                "name": "f", "parameters": {"type": "object", "properties": {}}}}])


def test_episode_token_limit_stops_it_as_the_runner_does(policy):
    task = make_tasks("server", 1, seed=6)[0]
    probe = run_episodes(policy.engine, policy.renderer, GuessNumberEnv, [task], n=1, limits=LIMITS, greedy=True)[0]
    assert probe.num_turns >= 3
    # room for exactly two turns: the third call would overflow
    cap = len(probe.prompt_ids) + len(probe.completion_ids()[: probe.action_spans()[1][1]]) + LIMITS.max_new_tokens
    cap += len(probe.turns[2].obs_ids) - 1
    limits = EpisodeLimits(max_turns=4, max_new_tokens=6, max_episode_tokens=cap)
    ref = run_episodes(policy.engine, policy.renderer, GuessNumberEnv, [task], n=1, limits=limits, greedy=True)[0]
    assert ref.num_turns == 2 and ref.stop_reason == "max_tokens"
    hub = make_hub(policy, limits)
    with serving(hub) as server:
        played = play_in_background(hub, [task], n=1, greedy=True)
        client = EpisodeClient(server.base_url)
        ep = client.next_task(timeout=10)
        with pytest.raises(ServerError) as over:
            play_guess(lambda m: client.chat(ep.episode_id, m), ep.task)
        assert over.value.status == 400 and over.value.code == "context_length_exceeded"
        with pytest.raises(ServerError) as stopped:
            client.chat(ep.episode_id, [{"role": "user", "content": task["prompt"]}])
        assert stopped.value.status == 409 and "max_tokens limit" in stopped.value.message
        client.finish(ep.episode_id, 0.0, False)
        (got,) = played.join()
    assert [t.action_ids for t in got.turns] == [t.action_ids for t in ref.turns]
    assert got.token_ids() == ref.token_ids()
    assert got.stop_reason == "max_tokens" and got.final_observation == ref.final_observation


def test_tool_and_user_messages_in_one_turn_render_as_the_chat_template(policy):
    """Several new messages in one call (a tool result, then a user message) become one observation: the recorded
    context decodes to exactly the chat template's rendering of the whole conversation."""
    hub = make_hub(policy, LIMITS, context_fn=memory_fn)
    task = make_tasks("server", 1, seed=9)[0]
    with serving(hub) as server:
        play_in_background(hub, [task], n=1, greedy=True)
        client = EpisodeClient(server.base_url)
        ep = client.next_task(timeout=10)
        msgs = [{"role": "system", "content": "Use the tool."}, {"role": "user", "content": task["prompt"]}]
        msgs.append({"role": "assistant", "content": client.chat(ep.episode_id, msgs)})
        msgs += [{"role": "tool", "content": "lookup -> 7"}, {"role": "user", "content": "Now guess."}]
        msgs.append({"role": "assistant", "content": client.chat(ep.episode_id, msgs)})
        with pytest.raises(ServerError, match="a system message after the first call"):
            client.chat(ep.episode_id, msgs + [{"role": "system", "content": "late"}])
        with pytest.raises(openai.BadRequestError, match="plain inference"):
            client.openai(ep.episode_id).completions.create(model="m", prompt="x", max_tokens=2)
        live = hub.live(ep.episode_id)
    traj = live.trajectory
    assert traj.num_turns == 2 and traj.turns[1].observation == "lookup -> 7\n\nNow guess."
    full = [{"role": "system", "content": "Use the tool.\n\n" + MEMORY}] + msgs[1:]
    want = policy.tokenizer.apply_chat_template(full, tokenize=False, add_generation_prompt=False)
    got = policy.tokenizer.decode(traj.token_ids(), skip_special_tokens=False)
    # up to the end of the last turn, which the template closes ("<|eos|>\n"; the action's own EOS when it has one)
    assert want.startswith(got) and want[len(got):] == ("\n" if traj.turns[-1].finished else "<|eos|>\n")
    assert not traj.turns[0].finished  # the first action was cut: its end-of-turn text came with the observation


def test_not_ready_no_episode_and_training_ended(policy):
    hub = make_hub(policy, LIMITS)
    engine, hub.engine = hub.engine, None
    msgs = [{"role": "user", "content": "Guess my number from 1 to 16."}]
    with serving(hub) as server:
        client = EpisodeClient(server.base_url)
        with pytest.raises(ServerError) as warming:
            client.chat(None, msgs)
        assert warming.value.status == 503 and warming.value.code == "not_ready"
        hub.engine = engine  # the trainer side sets it once the policy exists
        assert client.chat(None, msgs, max_tokens=2) is not None
        assert client.next_task(timeout=0.1) is None  # nothing handed out: 204
        hub.close()
        assert client.next_task(timeout=5) is None  # training ended: 410
        with pytest.raises(ServerError) as ended:
            client._request("POST", "/episodes/start", {"timeout": 0})
        assert ended.value.status == 410 and ended.value.code == "hub_closed"


def test_a_call_past_max_turns_stops_the_episode_as_the_runner_does(policy):
    task = make_tasks("server", 1, seed=12)[0]
    limits = EpisodeLimits(max_turns=2, max_new_tokens=6)
    ref = run_episodes(policy.engine, policy.renderer, GuessNumberEnv, [task], n=1, limits=limits, greedy=True)[0]
    assert ref.stop_reason == "max_turns" and ref.num_turns == 2
    hub = make_hub(policy, limits)
    with serving(hub) as server:
        played = play_in_background(hub, [task], n=1, greedy=True)
        client = EpisodeClient(server.base_url)
        ep = client.next_task(timeout=10)
        with pytest.raises(ServerError) as over:
            play_guess(lambda m: client.chat(ep.episode_id, m), ep.task)
        assert over.value.status == 400 and over.value.code == "max_turns_exceeded"
        client.finish(ep.episode_id, 0.0, False)
        (got,) = played.join()
    assert got.token_ids() == ref.token_ids() and got.action_mask() == ref.action_mask()
    assert got.stop_reason == "max_turns" and not got.done
    assert got.final_observation == ref.final_observation


def test_plain_text_rendering_without_a_chat_template_is_recorded_as_the_runner_does(policy):
    """``use_chat_template: no``: prompts are plain lines; the recorded episode still equals the runner's."""
    from policy_server_helpers import Policy

    from critique_rl.agents.trajectory import TurnRenderer

    plain = Policy(policy.tokenizer, policy.model, policy.engine, TurnRenderer(policy.tokenizer, use_chat=False))
    task = make_tasks("plain", 1, seed=13)[0]
    ref = run_episodes(plain.engine, plain.renderer, GuessNumberEnv, [task], n=1, limits=LIMITS, greedy=True,
                       context_fn=memory_fn)[0]
    hub = make_hub(plain, LIMITS, context_fn=memory_fn)
    with serving(hub) as server:
        played = play_in_background(hub, [task], n=1, greedy=True)
        client = EpisodeClient(server.base_url)
        ep = client.next_task(timeout=10)
        replies, ret, success = play_guess(lambda m: client.chat(ep.episode_id, m), ep.task)
        client.finish(ep.episode_id, ret, success)
        (got,) = played.join()
    assert got.turns[0].obs_ids == plain.renderer.encode(f"{MEMORY}\n{task['prompt']}\n")
    assert_same_episode(got, ref)
