"""Token-exact recording of an episode played over HTTP (``/v1/chat/completions`` calls) into a :class:`Trajectory`.

A remote client sends the whole chat history on every call. The server never re-tokenises that history: it
checks that the request's messages extend what it recorded (its own replies included, verbatim), renders only
the **new** messages into tokens, exactly as the in-process runner (:mod:`critique_rl.agents.runner`) renders an
env observation, and appends them to the episode's context ids. The engine is called on those ids and the turn
keeps the exact generated ids and sampling log-probs. For the same actions, the finished :class:`Trajectory`
is token for token the one :func:`~critique_rl.agents.runner.run_episodes` builds:

- first call: ``[system...] + [user]`` -> ``TurnRenderer.first(user, context)``, where ``context`` is the client's
  system text followed by the episode's injected context (``hub.context``: retrieved memory, then a critique for
  a refinement), so ``context == join(memory_context, critique)`` holds as for built-in episodes;
- later calls: ``history + [assistant reply as sent] + [user]`` -> ``TurnRenderer.observation(user, finished)``;
- several new messages (a tool result then a user message, ...) are rendered the same way, as one observation;
- limits as the runner: ``max_new_tokens`` per call; ``max_turns`` calls (one more: the episode stops with
  ``stop_reason="max_turns"``, the call gets ``max_turns_exceeded``); ``max_episode_tokens``, checked before the
  call (the episode stops with ``stop_reason="max_tokens"``, the call gets ``context_length_exceeded``).

The hub (:mod:`critique_rl.agents.episode_hub`) owns the episodes (:class:`LiveEpisode`, re-exported here); this
module owns the recording rule (:func:`prepare_call`, :func:`record_call`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from critique_rl.agents.episode_hub import EpisodeError, LiveEpisode
from critique_rl.agents.runner import EpisodeLimits
from critique_rl.agents.trajectory import _ACTION_PROBE, _USER_PROBE, Turn, TurnRenderer
from critique_rl.rollout.base import Completion

__all__ = ["EpisodeError", "LiveEpisode", "PreparedCall", "RequestError", "check_extends", "normalize_messages",
           "observation_of", "prepare_call", "record_call", "release_call", "split_first"]

ROLES = ("system", "developer", "user", "assistant", "tool")


class RequestError(Exception):
    """A request the server refuses: ``status`` (HTTP), ``code`` and ``param`` as in OpenAI's error body."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request", param: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.param = param


def join_context(*parts: str | None) -> str | None:
    """Context texts joined as the runner joins memory and critique (blank line between, empty parts dropped)."""
    return "\n\n".join(p for p in parts if p) or None


def _gone(live: LiveEpisode) -> EpisodeError | None:
    if live.state == "live":
        return None
    why = f"dropped ({live.reason})" if live.state == "dropped" and live.reason else live.state
    return EpisodeError(f"episode '{live.episode_id}' takes no more calls: {why}", 409)


@dataclass
class PreparedCall:
    """One validated call: the ids to generate from and what to record when the engine answers."""

    live: LiveEpisode | None
    prompt_ids: list[int]
    observation: str
    obs_ids: list[int]
    messages: list[dict[str, str]]
    max_new_tokens: int
    context: str | None = None
    client_system: str | None = None


# ---- messages ------------------------------------------------------------------------------------------------

def content_text(content: Any, where: str) -> str:
    """A message's content as text: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"{where}.content[{j}]: only text parts ({{'type': 'text', 'text': ...}}) are "
                                   "supported", param=f"{where}.content")
            out.append(part["text"])
        return "".join(out)
    raise RequestError(f"{where}.content: expected a string or a list of text parts, got "
                       f"{type(content).__name__}", param=f"{where}.content")


def normalize_messages(raw: Any) -> list[dict[str, str]]:
    """Request messages -> ``[{"role", "content"}]`` (``developer`` is a system message); clear errors naming the
    message index and field."""
    if not isinstance(raw, list) or not raw:
        raise RequestError("messages: expected a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{where}: expected an object with role and content", param=where)
        role = m.get("role")
        if role not in ROLES:
            raise RequestError(f"{where}.role = {role!r}: use one of {', '.join(ROLES)}", param=f"{where}.role")
        if m.get("tool_calls") or m.get("function_call"):
            raise RequestError(f"{where}: tool_calls are not supported (the policy writes tool calls as text in "
                               "content; send tool results as role 'tool' or 'user' messages)", param=where)
        content = m.get("content")
        text = "" if content is None and role == "assistant" else content_text(content, where)
        out.append({"role": "system" if role == "developer" else role, "content": text})
    return out


def _describe(m: dict[str, str]) -> str:
    text = m["content"]
    return f"{m['role']} {text[:60]!r}{'...' if len(text) > 60 else ''}"


def check_extends(recorded: list[dict[str, str]], messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The new messages after ``recorded`` (the episode's history, replies included); a :class:`RequestError`
    naming the first differing index when ``messages`` does not extend it with user/tool message(s)."""
    for i, want in enumerate(recorded):
        if i >= len(messages):
            raise RequestError(f"messages[{i}] is missing: the request has {len(messages)} messages, the episode's "
                               f"history {len(recorded)}; send the whole history (messages[{i}] expected: "
                               f"{_describe(want)})",
                               param=f"messages[{i}]", code="history_mismatch")
        got = messages[i]
        if got != want:
            raise RequestError(f"messages[{i}] differs from the episode's history: expected {_describe(want)}, got "
                               f"{_describe(got)} (send earlier messages and replies unchanged)",
                               param=f"messages[{i}]", code="history_mismatch")
    new = messages[len(recorded):]
    if not new:
        raise RequestError("messages adds nothing to the episode's history: append the next user or tool message",
                           param=f"messages[{len(recorded)}]", code="history_mismatch")
    for j, m in enumerate(new, start=len(recorded)):
        if m["role"] == "assistant":
            raise RequestError(f"messages[{j}] is an assistant message the server did not write: an episode's "
                               "assistant messages are the server's replies, sent back unchanged",
                               param=f"messages[{j}]", code="history_mismatch")
        if recorded and m["role"] == "system":
            raise RequestError(f"messages[{j}]: a system message after the first call; put it in the first call or "
                               "send it as a user message", param=f"messages[{j}]", code="history_mismatch")
    return new


# ---- rendering (the runner's rules, generalised to several new messages) --------------------------------------

def observation_of(new: list[dict[str, str]]) -> str:
    """The text a turn keeps as its observation: the new message's content (several: joined by blank lines)."""
    return "\n\n".join(m["content"] for m in new)


def first_ids(renderer: TurnRenderer, new: list[dict[str, str]], context: str | None) -> list[int]:
    """The first prompt's ids: ``renderer.first`` for one user message (the runner's case), else the chat template
    over the system context and all messages (plain text: each content on its own line)."""
    if len(new) == 1 and new[0]["role"] == "user":
        return renderer.first(new[0]["content"], context)
    if not renderer.use_chat:
        return renderer.encode((f"{context}\n" if context else "") + "".join(m["content"] + "\n" for m in new))
    msgs = ([{"role": "system", "content": context}] if context else []) + new
    return renderer.encode(renderer.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))


def observation_ids(renderer: TurnRenderer, new: list[dict[str, str]], action_finished: bool) -> list[int]:
    """Ids appended after an action for the new messages: ``renderer.observation`` for one user message (the
    runner's case), else the same probe rendering with all of them."""
    if len(new) == 1 and new[0]["role"] == "user":
        return renderer.observation(new[0]["content"], action_finished)
    if not renderer.use_chat:
        return renderer.encode(("" if action_finished else "\n") + "".join(m["content"] + "\n" for m in new))
    base = [{"role": "user", "content": _USER_PROBE}, {"role": "assistant", "content": _ACTION_PROBE}]
    render = renderer.tokenizer.apply_chat_template
    base_text = render(base, tokenize=False, add_generation_prompt=False)
    full = render(base + new, tokenize=False, add_generation_prompt=True)
    if not full.startswith(base_text):
        raise RequestError("the chat template renders earlier turns differently once these messages are added; "
                           "send one user message per turn", code="template_not_prefix_stable")
    tail = renderer._end_of_turn
    if action_finished and renderer.eos_text and tail.startswith(renderer.eos_text):
        tail = tail[len(renderer.eos_text):]
    return renderer.encode(tail + full[len(base_text):])


# ---- one call --------------------------------------------------------------------------------------------------

def split_first(messages: list[dict[str, str]]) -> tuple[str | None, list[dict[str, str]]]:
    """A first call's messages -> (the client's system text, the observation messages after it)."""
    n_sys = 0
    while n_sys < len(messages) and messages[n_sys]["role"] == "system":
        n_sys += 1
    return join_context(*(m["content"] for m in messages[:n_sys])), check_extends([], messages[n_sys:])


def prepare_call(live: LiveEpisode, messages: list[dict[str, str]], renderer: TurnRenderer, limits: EpisodeLimits,
                 max_new_tokens: int, injected: str | None = None) -> PreparedCall:
    """Validate a call against the episode and build the ids to generate from; marks the episode busy (release
    with :func:`record_call` or :func:`release_call`). ``injected``: the hub's system text for the episode
    (``hub.context``), used at the first call. Raises :class:`EpisodeError` / :class:`RequestError`."""
    with live.lock:
        gone = _gone(live)
        if gone is not None:
            raise gone
        stopped = getattr(live, "stopped", None)
        if stopped is not None:
            raise EpisodeError(f"episode '{live.episode_id}' stopped at its {stopped} limit: finish it with "
                               "POST /v1/episodes/{id}/finish", 409)
        if getattr(live, "busy", False):
            raise EpisodeError(f"episode '{live.episode_id}' has a call in flight: wait for its reply first", 409)
        traj = live.trajectory
        prepared = PreparedCall(live=live, prompt_ids=[], observation="", obs_ids=[], messages=messages,
                                max_new_tokens=max_new_tokens)
        if not traj.turns:
            prepared.client_system, new = split_first(messages)
            prepared.context = join_context(prepared.client_system, injected)
            prepared.obs_ids = first_ids(renderer, new, prepared.context)
            prepared.prompt_ids = list(prepared.obs_ids)
        else:
            new = check_extends(live.messages, messages)
            prepared.obs_ids = observation_ids(renderer, new, traj.turns[-1].finished)
            prepared.prompt_ids = live.ids + prepared.obs_ids
        prepared.observation = observation_of(new)
        if len(traj.turns) >= limits.max_turns:
            _stop(live, "max_turns", prepared.observation)
            raise RequestError(f"episode '{live.episode_id}' used its {limits.max_turns} turns (max_turns): finish it "
                               "with POST /v1/episodes/{id}/finish", code="max_turns_exceeded", param="messages")
        if (limits.max_episode_tokens is not None
                and len(prepared.prompt_ids) + max_new_tokens > limits.max_episode_tokens):
            _stop(live, "max_tokens", prepared.observation if traj.turns else None)
            raise RequestError(f"episode '{live.episode_id}': {len(prepared.prompt_ids)} context tokens + "
                               f"max_tokens {max_new_tokens} > max_episode_tokens {limits.max_episode_tokens}; the "
                               "episode stopped, finish it with POST /v1/episodes/{id}/finish",
                               code="context_length_exceeded", param="messages")
        live.busy = True  # type: ignore[attr-defined]
        return prepared


def _stop(live: LiveEpisode, reason: str, final_observation: str | None) -> None:
    """A limit ends the episode as the runner ends it (``stop_reason``, ``final_observation``, not done)."""
    live.stopped = reason  # type: ignore[attr-defined]
    live.trajectory.stop_reason = reason  # type: ignore[assignment]
    live.trajectory.final_observation = final_observation


def release_call(prepared: PreparedCall) -> None:
    """The call failed before recording (engine error): the episode takes calls again."""
    if prepared.live is not None:
        with prepared.live.lock:
            prepared.live.busy = False  # type: ignore[attr-defined]


def record_call(prepared: PreparedCall, completion: Completion) -> Turn | None:
    """Append the turn the engine generated (exact ids and log-probs) and the reply to the history; None (nothing
    recorded) for a call without an episode. Raises :class:`EpisodeError` when the hub finished or dropped the
    episode while the call ran (its turn is discarded)."""
    live = prepared.live
    if live is None:
        return None
    with live.lock:
        live.busy = False  # type: ignore[attr-defined]
        gone = _gone(live)
        if gone is None and live.trajectory.done:  # finished under this lock, state not yet updated by the hub
            gone = EpisodeError(f"episode '{live.episode_id}' takes no more calls: finished", 409)
        if gone is not None:
            raise EpisodeError(f"{gone}; this call's reply is not recorded", 409)
        traj = live.trajectory
        if not traj.turns:
            live.client_system = prepared.client_system  # type: ignore[attr-defined]
            if prepared.client_system:
                traj.context = prepared.context
                traj.memory_context = join_context(prepared.client_system, traj.memory_context)
        turn = Turn(observation=prepared.observation, obs_ids=list(prepared.obs_ids),
                    action_ids=list(completion.token_ids), action_logprobs=list(completion.logprobs),
                    action_text=completion.text, finished=completion.finished)
        traj.turns.append(turn)
        live.ids = prepared.prompt_ids + list(completion.token_ids)
        live.messages = list(prepared.messages) + [{"role": "assistant", "content": completion.text}]
        return turn
