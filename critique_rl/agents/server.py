"""An OpenAI-compatible HTTP server in front of the policy being trained (``critique-rl serve``).

Endpoints (JSON; errors in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``, one per bad
request, the server keeps serving):

- ``POST /v1/chat/completions``: the agent loop's calls. A call with an episode id (header ``X-Episode-Id``,
  body ``metadata.episode_id`` or body ``user``) is recorded token-exactly into that episode
  (:mod:`critique_rl.agents.server_record`) and samples with the training settings (the hub's temperature and
  top-p; greedy for evaluation episodes); a call without one is plain inference with the request's
  ``temperature``/``top_p``. ``max_tokens`` (or ``max_completion_tokens``) is honoured up to the configured
  per-turn limit. ``stream: true`` answers as server-sent events (the whole reply in one content chunk: the
  engine generates a batch at a time). ``logprobs: true`` returns the sampling log-prob of every token.
- ``POST /v1/completions``: plain text completion (not recorded).
- ``GET /v1/models``: the served model name.
- ``POST /v1/episodes/start`` (``{"timeout": s}``) -> ``{"episode_id", "task", "group_id", "policy_version"}``,
  204 when no episode is to be handed out in time, 410 once training has ended (the hub is closed).
- ``POST /v1/episodes/{id}/finish`` (``{"reward", "success", "feedback"}``) -> ``{"episode_id", "accepted",
  "reason"}``.
- ``GET /v1/episodes/stats``: the hub's counts plus the server's (calls, engine calls, mean batch).

Concurrent calls are **batched** (:mod:`critique_rl.agents.server_batching`): a single engine thread takes the
calls waiting and generates them in one engine call per sampling setting, under the hub's ``engine_lock`` (the
trainer holds it during optimizer steps); routing, bodies and errors are :mod:`critique_rl.agents.server_http`. The server binds 127.0.0.1 unless told
otherwise; with ``api_key_env`` set every request needs ``Authorization: Bearer <that variable's value>`` (the
key is read from the environment once and never logged).
"""

from __future__ import annotations

import hmac
import os
import threading
from dataclasses import dataclass
from typing import Any

from critique_rl.agents.server_batching import EngineBatcher
from critique_rl.agents.server_http import EPISODE_HEADER, PolicyHandler, PolicyHTTPServer, episode_id_of
from critique_rl.agents.server_record import (
    PreparedCall,
    RequestError,
    normalize_messages,
    observation_of,
    prepare_call,
    record_call,
    release_call,
    split_first,
)
from critique_rl.errors import UserError
from critique_rl.rollout.base import Completion, SamplingParams

__all__ = ["EPISODE_HEADER", "EngineBatcher", "PolicyServer", "ServeOptions", "episode_id_of"]
_UNSUPPORTED = {  # request fields that would change what is sampled; refused rather than ignored
    "tools": "tools are not supported: describe tools in the system message and parse calls from the content",
    "tool_choice": "tool_choice is not supported (no tools)",
    "functions": "functions are not supported: describe them in the system message",
    "stop": "stop sequences are not supported (an action is exactly the tokens generated up to EOS or max_tokens)",
    "logit_bias": "logit_bias is not supported",
    "response_format": "response_format is not supported",
}
_ZERO_ONLY = ("presence_penalty", "frequency_penalty")


@dataclass
class ServeOptions:
    """How the HTTP side serves. Sampling of recorded episodes comes from the hub (the training config)."""

    host: str = "127.0.0.1"
    """Interface to bind; 127.0.0.1 keeps the server local (use 0.0.0.0 only behind a bearer token)."""
    port: int = 8000
    """TCP port (0: any free port; :attr:`PolicyServer.base_url` says which)."""
    api_key_env: str | None = None
    """Name of an environment variable holding the bearer token every request must send (None: no token)."""
    max_batch: int = 32
    """Most calls generated in one engine call."""
    batch_wait_ms: float = 10.0
    """Longest the engine thread waits for more calls after the first one of a batch arrives (a batch runs at
    once when every episode in flight already has its call in it)."""
    batch_wait_fraction: float = 0.1
    """... or up to this fraction of the last engine call's time when that is longer (a slow engine waits longer
    for stragglers: merging them saves a whole engine call; waiting costs at most this fraction)."""
    max_tokens: int | None = None
    """Per-call cap on ``max_tokens`` for plain (unrecorded) calls; None: the episode limit (``max_new_tokens``)."""
    max_temperature: float = 2.0
    """Highest ``temperature`` a plain call may ask for."""
    start_timeout_s: float = 30.0
    """Longest a ``/v1/episodes/start`` call waits for an episode (the request's ``timeout`` is capped here)."""
    max_body_bytes: int = 8 << 20
    """Largest request body accepted (413 above)."""
    record_batches: bool = False
    """Keep every engine call's prompt ids and sampling settings in :attr:`EngineBatcher.batches` (benchmarks)."""

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise UserError(f"serve max_batch = {self.max_batch}: use >= 1")
        if self.batch_wait_ms < 0:
            raise UserError(f"serve batch_wait_ms = {self.batch_wait_ms}: use >= 0")
        if not 0 <= self.batch_wait_fraction <= 1:
            raise UserError(f"serve batch_wait_fraction = {self.batch_wait_fraction}: use a fraction from 0 to 1")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise UserError(f"serve max_tokens = {self.max_tokens}: use >= 1 or leave unset")


# ---- the server ----------------------------------------------------------------------------------------------

class PolicyServer:
    """The HTTP server over an :class:`~critique_rl.agents.episode_hub.EpisodeHub` (which holds the engine,
    tokenizer, renderer, limits and sampling settings; they are read at each call, so the trainer side may set
    them after the server started). Use as a context manager, or :meth:`start` / :meth:`stop`."""

    def __init__(self, hub: Any, options: ServeOptions | None = None) -> None:
        self.hub = hub
        self.options = options or ServeOptions()
        self._api_key: str | None = None
        if self.options.api_key_env:
            key = os.environ.get(self.options.api_key_env)
            if not key:
                raise UserError(f"serve api_key_env = {self.options.api_key_env!r}, but that environment variable "
                                "is not set or empty: export it (the token clients must send as 'Authorization: "
                                "Bearer ...')")
            self._api_key = key
        self.batcher: EngineBatcher | None = None
        self._httpd: PolicyHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.counts = {"requests": 0, "chat_calls": 0, "recorded_calls": 0, "errors": 0}
        self._count_lock = threading.Lock()
        self._handler_cpu_s = 0.0
        self._tok_lock = threading.Lock()  # one handler at a time in the (Rust-backed) tokenizer: no borrow errors

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> PolicyServer:
        server = self

        class Handler(PolicyHandler):
            owner = server

        o = self.options
        self._httpd = PolicyHTTPServer((o.host, o.port), Handler)
        self.batcher = EngineBatcher(self.hub, o.max_batch, o.batch_wait_ms / 1000.0, record=o.record_batches,
                                     wait_fraction=o.batch_wait_fraction)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="policy-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self.batcher is not None:
            self.batcher.close()

    def __enter__(self) -> PolicyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait(self) -> None:
        """Block until the server stops (the CLI's foreground)."""
        if self._thread is not None:
            self._thread.join()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "start() the server first"
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://{self.options.host}:{self.port}/v1"

    def pending(self, delta: int, expect_return: bool = False, returning: bool = False) -> None:
        if self.batcher is not None:
            self.batcher.add_pending(delta, expect_return=expect_return, returning=returning)

    def add_handler_cpu(self, seconds: float) -> None:
        with self._count_lock:
            self._handler_cpu_s += seconds

    def handler_cpu_s(self) -> float:
        """CPU seconds the HTTP handler threads spent on requests (parsing, validation, rendering, recording,
        replies; not the engine, not waiting)."""
        with self._count_lock:
            return self._handler_cpu_s

    def _count(self, key: str) -> None:
        with self._count_lock:
            self.counts[key] += 1

    def authorized(self, header: str | None) -> bool:
        if self._api_key is None:
            return True
        if not header or header[:7].lower() != "bearer ":
            return False
        return hmac.compare_digest(header[7:].strip().encode(), self._api_key.encode())

    def stats(self) -> dict[str, Any]:
        b = self.batcher
        server = dict(self.counts)
        if b is not None:
            server.update(engine_calls=b.engine_calls, engine_rows=b.rows, engine_s=round(b.engine_s, 4),
                          mean_batch=round(b.rows / b.engine_calls, 2) if b.engine_calls else 0.0,
                          generated_tokens=b.generated_tokens)
        return {**self.hub.stats(), "server": server}

    # -- calls -------------------------------------------------------------------------------------------------
    def _engine_ready(self) -> None:
        if self.hub.engine is None or self.hub.renderer is None or self.hub.limits is None:
            raise RequestError("the policy is not loaded yet; retry in a few seconds", status=503,
                               code="not_ready")

    def _plain_params(self, body: dict[str, Any], max_new: int) -> SamplingParams:
        temp = _number(body, "temperature", self.hub.temperature, 0.0, self.options.max_temperature)
        top_p = _number(body, "top_p", self.hub.top_p, 1e-6, 1.0)
        return SamplingParams(n=1, temperature=temp if temp > 0 else 1.0, top_p=top_p, max_new_tokens=max_new,
                              greedy=temp == 0)

    def _cap(self, episode: bool) -> int:
        limit = int(self.hub.limits.max_new_tokens)
        return limit if episode or self.options.max_tokens is None else int(self.options.max_tokens)

    def chat(self, body: dict[str, Any], episode_id: str | None,
             on_submit: Any = None) -> tuple[PreparedCall, Completion, Any]:
        """Validate, prepare (record rule), generate and record one chat call; ``on_submit()`` runs when the call
        is queued for the engine and says whether the request was counted in the batcher's ``pending`` (it stops
        counting as the call is queued)."""
        assert self.batcher is not None
        prepared, params = self._prepare(body, episode_id)
        held = bool(on_submit()) if on_submit is not None else False
        try:
            completion = self.batcher.submit(prepared.prompt_ids, params, release_pending=held)
        except BaseException:
            release_call(prepared)
            raise
        turn = record_call(prepared, completion)
        if episode_id is not None:
            self.hub.touch(episode_id)
            self._count("recorded_calls")
        return prepared, completion, turn

    def _prepare(self, body: dict[str, Any], episode_id: str | None) -> tuple[PreparedCall, SamplingParams]:
        self._engine_ready()
        _check_request(body)
        messages = normalize_messages(body.get("messages"))
        hub = self.hub
        if episode_id is not None:
            live = hub.live(episode_id)
            hub.touch(episode_id)
            max_new = _max_tokens(body, self._cap(True), "agent.max_turn_tokens")
            injected = live.trajectory.context
            if not live.trajectory.turns:
                injected = hub.context(episode_id, observation_of(split_first(messages)[1]))
            with self._tok_lock:
                prepared = prepare_call(live, messages, hub.renderer, hub.limits, max_new, injected)
            base = hub.sampling_params(greedy=bool(getattr(live, "greedy", False)))
            params = SamplingParams(n=1, temperature=base.temperature, top_p=base.top_p, max_new_tokens=max_new,
                                    greedy=base.greedy)
        else:
            max_new = _max_tokens(body, self._cap(False), "serve max_tokens")
            renderer = hub.renderer
            with self._tok_lock:
                ids = renderer.encode(renderer.render_messages(messages, add_generation_prompt=True))
            _check_length(hub.limits, len(ids), max_new)
            prepared = PreparedCall(None, ids, observation_of(messages), ids, messages, max_new)
            params = self._plain_params(body, max_new)
        return prepared, params

    def complete(self, body: dict[str, Any]) -> tuple[list[int], Completion, SamplingParams]:
        self._engine_ready()
        _check_request(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError("prompt: expected one string (batches of prompts: send one request each; they are "
                               "batched on the server)", param="prompt")
        max_new = _max_tokens(body, self._cap(False), "serve max_tokens")
        with self._tok_lock:
            ids = self.hub.renderer.encode(prompt)
        _check_length(self.hub.limits, len(ids), max_new)
        params = self._plain_params(body, max_new)
        assert self.batcher is not None
        return ids, self.batcher.submit(ids, params), params


def _check_request(body: dict[str, Any]) -> None:
    for key, why in _UNSUPPORTED.items():
        if body.get(key) not in (None, [], {}):
            raise RequestError(why, param=key, code="unsupported_parameter")
    for key in _ZERO_ONLY:
        if body.get(key) not in (None, 0, 0.0):
            raise RequestError(f"{key} is not supported (leave it 0)", param=key, code="unsupported_parameter")
    n = body.get("n", 1)
    if n not in (None, 1):
        raise RequestError(f"n = {n!r}: the server returns one choice per call (send n calls)", param="n")
    top = body.get("top_logprobs")
    if top not in (None, 0):
        raise RequestError("top_logprobs is not supported (logprobs: true gives each sampled token's log-prob)",
                           param="top_logprobs", code="unsupported_parameter")


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key)
    if v is None:
        return float(default)
    if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= float(v) <= hi:
        raise RequestError(f"{key} = {v!r}: use a number from {lo:g} to {hi:g}", param=key)
    return float(v)


def _max_tokens(body: dict[str, Any], cap: int, name: str) -> int:
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    v = body.get(key)
    if v is None:
        return cap
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise RequestError(f"{key} = {v!r}: use an integer >= 1", param=key)
    if v > cap:
        raise RequestError(f"{key} = {v} is above the server's limit of {cap} new tokens per call ({name}); ask for "
                           f"at most {cap} or raise {name} in the config", param=key)
    return v


def _check_length(limits: Any, prompt_len: int, max_new: int) -> None:
    cap = getattr(limits, "max_episode_tokens", None)
    if cap is not None and prompt_len + max_new > cap:
        raise RequestError(f"{prompt_len} prompt tokens + max_tokens {max_new} > {cap} (agent.max_episode_tokens)",
                           param="messages", code="context_length_exceeded")
