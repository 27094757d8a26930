"""The policy server's HTTP side: routing, bodies, OpenAI-shaped errors and replies (stdlib ``http.server``).

Every error is one JSON body ``{"error": {"message", "type", "param", "code"}}`` (http.server's own errors too);
an unused request body is drained so a keep-alive connection stays usable; nothing is logged per request (the
bearer token, headers and messages stay private).
"""

from __future__ import annotations

import json
import logging
import socket
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from critique_rl.agents.server_record import EpisodeError, RequestError
from critique_rl.rollout.base import Completion

if TYPE_CHECKING:
    from critique_rl.agents.server import PolicyServer

log = logging.getLogger("critique_rl.agents.server")
EPISODE_HEADER = "X-Episode-Id"


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


class PolicyHTTPServer(ThreadingHTTPServer):
    request_queue_size = 128  # many agents connect at once (the default backlog of 5 drops connections)
    daemon_threads = True


_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 409: "conflict_error", 410: "gone",
                413: "invalid_request_error", 503: "server_unavailable"}


def error_body(message: str, status: int, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class PolicyHandler(BaseHTTPRequestHandler):
    owner: PolicyServer
    protocol_version = "HTTP/1.1"
    server_version = "critique-rl"
    wbufsize = 1 << 16  # status line, headers and body leave in one write (http.server flushes after each request)

    def log_message(self, format: str, *args: Any) -> None:  # no access log (bodies and headers stay private)
        pass

    def setup(self) -> None:
        super().setup()
        try:  # headers and body are separate writes: no Nagle delay between them
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    def handle_one_request(self) -> None:
        c0 = time.thread_time()
        try:
            super().handle_one_request()
        finally:
            self.owner.add_handler_cpu(time.thread_time() - c0)

    def handle_expect_100(self) -> bool:
        ok = super().handle_expect_100()
        self.wfile.flush()  # the client waits for this interim answer before it sends the body
        return ok

    # -- plumbing ----------------------------------------------------------------------------------------------
    def _send(self, status: int, payload: dict[str, Any] | None, close: bool = False) -> None:
        body = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        if payload is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if 400 <= status < 500:  # a client error is not retried by the openai client (it would retry 409 otherwise)
            self.send_header("x-should-retry", "false")
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
                    owner.pending(1, returning=path == "/v1/episodes/start")
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
            code = {404: "episode_not_found", 409: "episode_closed"}.get(exc.status, "invalid_request")
            self._error(exc.status, str(exc), code, "episode_id" if exc.status in (404, 409) else None)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away
        except Exception as exc:
            log.error("policy server: %s on %s: %s", type(exc).__name__, path, exc)
            try:
                self._error(500, f"server error: {type(exc).__name__}: {str(exc)[:300]}", code="server_error")
            except OSError:
                pass

    _pending = False
    _expect_return = False

    def _submitted(self) -> None:
        """This request can no longer add a call to the batch being collected (a finish while episodes are queued:
        its agent is expected back with a start, in the same step)."""
        if self._pending:
            self._pending = False
            expect, self._expect_return = self._expect_return, False
            self.owner.pending(-1, expect_return=expect)

    def _handoff(self) -> bool:
        """The chat call is being queued: whether this request was counted as pending (the batcher stops counting
        it as it takes the call, in one step)."""
        held, self._pending = self._pending, False
        return held

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
        prepared, c, turn = owner.chat(body, episode_id, on_submit=self._handoff)
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
        if episode_id_of(self.headers, body) is not None:
            raise RequestError("/v1/completions is plain inference: episodes are recorded through "
                               "/v1/chat/completions (drop the episode id or use the chat endpoint)",
                               param="episode_id", code="unsupported_parameter")
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
        if not hub.queued():
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
        hub = self.owner.hub
        self._send(200, hub.finish(episode_id, float(reward), success=success, feedback=feedback))
        self._expect_return = hub.queued() > 0  # its agent will likely ask for the next episode
