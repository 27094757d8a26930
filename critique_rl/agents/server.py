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

Concurrent calls are **batched**: a single engine thread takes the calls waiting (up to ``max_batch``, after at
most ``batch_wait_ms`` for more to arrive) and generates them in one engine call per sampling setting, under the
hub's ``engine_lock`` (the trainer holds it during optimizer steps). The server binds 127.0.0.1 unless told
otherwise; with ``api_key_env`` set every request needs ``Authorization: Bearer <that variable's value>`` (the
key is read from the environment once and never logged).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from critique_rl.agents.runner import generate_from_ids
from critique_rl.agents.server_record import (
    EpisodeError,
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

log = logging.getLogger(__name__)

EPISODE_HEADER = "X-Episode-Id"
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


# ---- the engine thread ---------------------------------------------------------------------------------------

class _Job:
    __slots__ = ("done", "error", "ids", "params", "result")

    def __init__(self, ids: list[int], params: SamplingParams) -> None:
        self.ids = ids
        self.params = params
        self.done = threading.Event()
        self.result: Completion | None = None
        self.error: BaseException | None = None


class EngineBatcher:
    """One thread that generates the waiting calls together, then runs one engine call per distinct sampling
    setting, holding ``hub.engine_lock``; calls arriving meanwhile form the next batch.

    When to run a batch: at once when no other call can join it (every episode in flight has its call waiting,
    so a lock-step wave of agents becomes one engine call), else after at most ``max(wait_s, wait_fraction *
    the last engine call's seconds)`` since its first call, or at ``max_batch`` calls."""

    def __init__(self, hub: Any, max_batch: int, wait_s: float, record: bool = False,
                 wait_fraction: float = 0.0) -> None:
        self.hub = hub
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.wait_fraction = wait_fraction
        self.last_engine_s = 0.0
        self.batches: list[tuple[list[list[int]], SamplingParams]] | None = [] if record else None
        self.engine_calls = 0
        self.rows = 0
        self.engine_s = 0.0
        self.generated_tokens = 0
        self.pending = 0
        """Requests in progress that may still add a call to this batch: chat calls not yet queued, start calls
        while there are episodes to hand out, finish calls (their agent comes back with the next episode)."""
        self.count_lock = threading.Lock()
        self._q: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="policy-engine", daemon=True)
        self._thread.start()

    def submit(self, ids: list[int], params: SamplingParams) -> Completion:
        """Generate one completion for ``ids`` (blocks until its batch ran); the engine's error is re-raised."""
        job = _Job(ids, params)
        self._q.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=30)

    def _nobody_else(self, batch_len: int) -> bool:
        """Whether every episode in flight already has its call in this batch (no one else could join)."""
        try:
            in_flight = int(self.hub.stats()["in_flight"])
        except Exception:  # a hub without stats: fall back to the time window
            return False
        return in_flight <= batch_len and self.pending == 0 and self._q.empty()

    def _loop(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            batch = [job]
            deadline = time.monotonic() + max(self.wait_s, self.wait_fraction * self.last_engine_s)
            stop = False
            while len(batch) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0 or self._nobody_else(len(batch)):
                    break
                try:
                    nxt = self._q.get(timeout=min(left, 0.002))
                except queue.Empty:
                    continue
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            while len(batch) < self.max_batch and not stop:  # whatever is already queued joins
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                else:
                    batch.append(nxt)
            self._run(batch)
            if stop:
                return

    def _run(self, batch: list[_Job]) -> None:
        groups: dict[tuple, list[_Job]] = {}
        for j in batch:
            p = j.params
            groups.setdefault((p.temperature, p.top_p, p.max_new_tokens, p.greedy, p.n), []).append(j)
        for jobs in groups.values():
            params = jobs[0].params
            ids = [j.ids for j in jobs]
            try:
                engine, tokenizer = self.hub.engine, self.hub.tokenizer
                if engine is None:
                    raise RuntimeError("the policy engine is not loaded yet")
                with self.hub.engine_lock:
                    t0 = time.perf_counter()
                    outs = generate_from_ids(engine, tokenizer, ids, params)
                    self.last_engine_s = time.perf_counter() - t0
                    self.engine_s += self.last_engine_s
                if len(outs) != len(jobs):
                    raise RuntimeError(f"the engine returned {len(outs)} results for {len(jobs)} prompts")
                self.engine_calls += 1
                self.rows += len(jobs)
                if self.batches is not None:
                    self.batches.append((ids, params))
                for j, group in zip(jobs, outs, strict=True):
                    j.result = group[0]
                    self.generated_tokens += len(group[0].token_ids)
            except Exception as exc:  # every caller of the failed engine call gets the error
                for j in jobs:
                    j.error = exc
            finally:
                for j in jobs:
                    j.done.set()


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
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.counts = {"requests": 0, "chat_calls": 0, "recorded_calls": 0, "errors": 0}
        self._count_lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> PolicyServer:
        server = self

        class Handler(_Handler):
            owner = server

        o = self.options
        self._httpd = _HTTPServer((o.host, o.port), Handler)
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

    def pending(self, delta: int) -> None:
        if self.batcher is not None:
            with self.batcher.count_lock:
                self.batcher.pending += delta

    def _count(self, key: str) -> None:
        with self._count_lock:
            self.counts[key] += 1

    def authorized(self, header: str | None) -> bool:
        if self._api_key is None:
            return True
        if not header or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[len("Bearer "):].strip().encode(), self._api_key.encode())

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
        is queued for the engine."""
        assert self.batcher is not None
        prepared, params = self._prepare(body, episode_id)
        if on_submit is not None:
            on_submit()
        try:
            completion = self.batcher.submit(prepared.prompt_ids, params)
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
            prepared = prepare_call(live, messages, hub.renderer, hub.limits, max_new, injected)
            base = hub.sampling_params(greedy=bool(getattr(live, "greedy", False)))
            params = SamplingParams(n=1, temperature=base.temperature, top_p=base.top_p, max_new_tokens=max_new,
                                    greedy=base.greedy)
        else:
            max_new = _max_tokens(body, self._cap(False), "serve max_tokens")
            renderer = hub.renderer
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


def episode_id_of(headers: Any, body: dict[str, Any]) -> str | None:
    """The call's episode id: header ``X-Episode-Id``, body ``metadata.episode_id`` or body ``user`` (all given
    ones must agree)."""
    found: dict[str, str] = {}
    h = headers.get(EPISODE_HEADER)
    if h:
        found["header X-Episode-Id"] = h.strip()
    meta = body.get("metadata")
    if isinstance(meta, dict) and meta.get("episode_id") is not None:
        found["metadata.episode_id"] = meta["episode_id"]
    if body.get("user") is not None:
        found["user"] = body["user"]
    for where, v in found.items():
        if not isinstance(v, str) or not v:
            raise RequestError(f"{where}: the episode id must be a non-empty string", param=where)
    if len(set(found.values())) > 1:
        raise RequestError("the episode id differs between " + ", ".join(f"{k}={v!r}" for k, v in found.items()),
                           param="episode_id")
    return next(iter(found.values()), None)


# ---- HTTP ----------------------------------------------------------------------------------------------------

class _HTTPServer(ThreadingHTTPServer):
    request_queue_size = 128  # many agents connect at once (the default backlog of 5 drops connections)
    daemon_threads = True


_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 409: "conflict_error", 410: "gone",
                413: "invalid_request_error", 503: "server_unavailable"}


def error_body(message: str, status: int, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _Handler(BaseHTTPRequestHandler):
    owner: PolicyServer
    protocol_version = "HTTP/1.1"
    server_version = "critique-rl"

    def log_message(self, format: str, *args: Any) -> None:  # no access log (bodies and headers stay private)
        pass

    def setup(self) -> None:
        super().setup()
        try:  # headers and body are separate writes: no Nagle delay between them
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    # -- plumbing ----------------------------------------------------------------------------------------------
    def _send(self, status: int, payload: dict[str, Any] | None, close: bool = False) -> None:
        body = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        if payload is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _error(self, status: int, message: str, code: str | None = None, param: str | None = None,
               close: bool = False) -> None:
        self.owner._count("errors")
        self._send(status, error_body(message, status, code, param), close=close)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, unsupported method, ...) as one JSON error too."""
        try:
            self._error(code, message or explain or "bad request", code="bad_request", close=True)
        except OSError:
            pass

    def _drain(self) -> None:
        """Read and drop a body this endpoint does not use, so the keep-alive connection stays in sync."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if 0 <= length <= self.owner.options.max_body_bytes:
            if length:
                self.rfile.read(length)
        else:
            self.close_connection = True

    def _body(self) -> dict[str, Any] | None:
        """The JSON object body, or None after answering the error."""
        raw_len = self.headers.get("Content-Length")
        if raw_len is None:
            if self.headers.get("Transfer-Encoding"):
                self._error(411, "send the body with a Content-Length header", code="length_required", close=True)
                return None
            raw_len = "0"
        try:
            length = int(raw_len)
        except ValueError:
            self._error(400, f"Content-Length {raw_len!r} is not an integer", code="invalid_request", close=True)
            return None
        if length < 0 or length > self.owner.options.max_body_bytes:
            self._error(413, f"request body of {length} bytes is over the limit of "
                        f"{self.owner.options.max_body_bytes}", code="body_too_large", close=True)
            return None
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except ValueError as exc:
            self._error(400, f"the body is not valid JSON: {exc}", code="invalid_json")
            return None
        if not isinstance(body, dict):
            self._error(400, f"the body must be a JSON object, got {type(body).__name__}", code="invalid_json")
            return None
        return body

    def _route(self, method: str) -> None:
        owner = self.owner
        owner._count("requests")
        if not owner.authorized(self.headers.get("Authorization")):
            self._error(401, "missing or wrong bearer token (send 'Authorization: Bearer <key>')",
                        code="invalid_api_key", close=True)
            return
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            if method == "GET" and path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": owner.hub.model_name, "object": "model",
                                                             "created": 0, "owned_by": "critique-rl"}]})
            elif method == "GET" and path == "/v1/episodes/stats":
                self._send(200, owner.stats())
            elif method == "GET" and path in ("/health", "/v1/health"):
                self._send(200, {"ok": True})
            elif method != "POST" or path not in ("/v1/chat/completions", "/v1/completions", "/v1/episodes/start") \
                    and not (path.startswith("/v1/episodes/") and path.endswith("/finish")):
                known = path in ("/v1/models", "/v1/episodes/stats", "/v1/chat/completions", "/v1/completions",
                                 "/v1/episodes/start") or path.endswith("/finish")
                self._drain()
                if known:
                    self._error(405, f"{method} is not allowed on {path}", code="method_not_allowed")
                else:
                    self._error(404, f"no endpoint {path}", code="not_found")
            else:
                self._pending = path in ("/v1/chat/completions", "/v1/episodes/start") or path.endswith("/finish")
                if self._pending:
                    owner.pending(1)
                try:
                    body = self._body()
                    if body is None:
                        return
                    if path == "/v1/chat/completions":
                        self._chat(body)
                    elif path == "/v1/completions":
                        self._complete(body)
                    elif path == "/v1/episodes/start":
                        self._start(body)
                    else:
                        self._finish(path[len("/v1/episodes/"):-len("/finish")], body)
                finally:
                    self._submitted()
        except RequestError as exc:
            self._error(exc.status, exc.message, exc.code, exc.param)
        except EpisodeError as exc:
            self._error(exc.status, str(exc), "episode_not_found" if exc.status == 404 else "episode_closed",
                        "episode_id")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away
        except Exception as exc:
            log.error("policy server: %s on %s: %s", type(exc).__name__, path, exc)
            try:
                self._error(500, f"server error: {type(exc).__name__}: {str(exc)[:300]}", code="server_error")
            except OSError:
                pass

    _pending = False

    def _submitted(self) -> None:
        """This request can no longer add a call to the batch being collected."""
        if self._pending:
            self._pending = False
            self.owner.pending(-1)

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        self._route("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._route("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._route("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._route("DELETE")

    # -- endpoints ---------------------------------------------------------------------------------------------
    def _chat(self, body: dict[str, Any]) -> None:
        owner = self.owner
        owner._count("chat_calls")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError(f"stream = {stream!r}: use true or false", param="stream")
        episode_id = episode_id_of(self.headers, body)
        prepared, c, turn = owner.chat(body, episode_id, on_submit=self._submitted)
        model = owner.hub.model_name
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        finish_reason = "stop" if c.finished else "length"
        logprobs = self._logprobs(c) if body.get("logprobs") else None
        usage = {"prompt_tokens": len(prepared.prompt_ids), "completion_tokens": len(c.token_ids),
                 "total_tokens": len(prepared.prompt_ids) + len(c.token_ids)}
        extra = ({"episode_id": episode_id, "turn": len(prepared.live.trajectory.turns) - 1}
                 if prepared.live is not None and turn is not None else None)
        if not stream:
            choice = {"index": 0, "message": {"role": "assistant", "content": c.text}, "finish_reason": finish_reason,
                      "logprobs": logprobs}
            out = {"id": cid, "object": "chat.completion", "created": created, "model": model, "choices": [choice],
                   "usage": usage}
            if extra:
                out["critique_rl"] = extra
            self._send(200, out)
            return
        chunk = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
        events = [{**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": c.text},
                                         "logprobs": logprobs, "finish_reason": None}]},
                  {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": finish_reason}]}]
        opts = body.get("stream_options")
        if isinstance(opts, dict) and opts.get("include_usage"):
            events.append({**chunk, "choices": [], "usage": usage})
        data = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _logprobs(self, c: Completion) -> dict[str, Any]:
        tok = self.owner.hub.tokenizer
        content = []
        for tid, lp in zip(c.token_ids, c.logprobs, strict=False):
            piece = tok.decode([tid], skip_special_tokens=False)
            content.append({"token": piece, "logprob": float(lp), "bytes": list(piece.encode()), "top_logprobs": []})
        return {"content": content}

    def _complete(self, body: dict[str, Any]) -> None:
        if body.get("stream"):
            raise RequestError("stream is not supported on /v1/completions (use /v1/chat/completions)",
                               param="stream", code="unsupported_parameter")
        ids, c, _ = self.owner.complete(body)
        self._send(200, {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
            "model": self.owner.hub.model_name,
            "choices": [{"index": 0, "text": c.text, "logprobs": None,
                         "finish_reason": "stop" if c.finished else "length"}],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": len(c.token_ids),
                      "total_tokens": len(ids) + len(c.token_ids)}})

    def _start(self, body: dict[str, Any]) -> None:
        cap = self.owner.options.start_timeout_s
        timeout = body.get("timeout", cap)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0:
            raise RequestError(f"timeout = {timeout!r}: use a number of seconds >= 0", param="timeout")
        hub = self.owner.hub
        if hub.closed:
            raise RequestError("training has ended: no more episodes are handed out", status=410, code="hub_closed")
        if not hub.stats().get("queued", 1):
            self._submitted()  # nothing to hand out now: this agent adds no call to the batch being collected
        got = hub.start(timeout=min(float(timeout), cap))
        if got is None and hub.closed:
            raise RequestError("training has ended: no more episodes are handed out", status=410, code="hub_closed")
        if got is None:
            self._send(204, None)
        else:
            self._send(200, got)

    def _finish(self, episode_id: str, body: dict[str, Any]) -> None:
        if not episode_id or "/" in episode_id:
            raise RequestError(f"no episode id in the path /v1/episodes/{episode_id}/finish", param="episode_id")
        reward = body.get("reward")
        if isinstance(reward, bool) or not isinstance(reward, int | float):
            raise RequestError(f"reward = {reward!r}: send the episode's return as a number", param="reward")
        success = body.get("success")
        if success is not None and not isinstance(success, bool):
            raise RequestError(f"success = {success!r}: use true, false or null", param="success")
        feedback = body.get("feedback")
        if feedback is not None and not isinstance(feedback, str):
            raise RequestError("feedback: expected a string (the critique or the env's verdict) or null",
                               param="feedback")
        self._send(200, self.owner.hub.finish(episode_id, float(reward), success=success, feedback=feedback))
