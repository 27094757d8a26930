"""A small OpenAI-compatible ``/v1/chat/completions`` server for critic tests (stdlib only).

Runs a ``ThreadingHTTPServer`` on 127.0.0.1:0 in a background thread. Each request is answered by the next
scripted action (the last one repeats), or by ``responder(body) -> action`` when given, e.g. the tiny
in-repo model (:func:`tiny_model_responder`). Actions are dicts:

- ``{"content": "..."}``: a normal reply (``usage`` included)
- ``{"status": 429, "headers": {"Retry-After": "0.2"}}``: an error status
- ``{"hang": True}``: never answer (until the server stops)
- ``{"raw": b"..."}``: this exact body with status 200 (malformed JSON...)
- ``{"reset": True}``: close the connection with a TCP reset, no reply
- ``{"oversized": n}``: a 200 reply of ``n`` bytes
- ``{"trickle": seconds_per_byte}``: a valid reply, sent one byte at a time
- ``{"delay": s, ...}``: wait ``s`` seconds first, then do the rest of the action

It records request bodies and headers (names lower-cased), the number of requests, and the most requests in flight at once.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Action = dict[str, Any]


def completion_body(content: str, prompt_tokens: int = 11, completion_tokens: int = 7) -> bytes:
    """A minimal chat.completion JSON body."""
    return json.dumps(
        {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": "critic-test",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
    ).encode()


class CriticServer:
    """Scripted OpenAI-compatible server. Use as a context manager; ``base_url`` ends in ``/v1``."""

    def __init__(self, script: list[Action] | None = None, responder: Callable[[dict], Action] | None = None):
        self.script = list(script or [{"content": "Looks fine.\nVerdict: correct"}])
        self.responder = responder
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.bodies: list[dict] = []
        self.headers: list[dict[str, str]] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------
    def __enter__(self) -> CriticServer:
        server = self

        class Handler(_Handler):
            owner = server

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        httpd.daemon_threads = True
        httpd.block_on_close = False
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        assert self._httpd is not None
        self._httpd.shutdown()
        self._httpd.server_close()

    @property
    def port(self) -> int:
        assert self._httpd is not None
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def next_action(self, body: dict) -> Action:
        with self.lock:
            index = self.requests - 1
        if self.responder is not None:
            return self.responder(body)
        return self.script[min(index, len(self.script) - 1)]


class _Handler(BaseHTTPRequestHandler):
    owner: CriticServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def finish(self) -> None:
        try:
            super().finish()
        except (OSError, ValueError):
            pass

    def do_POST(self) -> None:  # noqa: N802 (http.server naming)
        owner = self.owner
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = {}
        with owner.lock:
            owner.requests += 1
            owner.in_flight += 1
            owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
            owner.bodies.append(body)
            owner.headers.append({k.lower(): v for k, v in self.headers.items()})
        try:
            if not self.path.rstrip("/").endswith("/chat/completions"):
                self._send(404, b'{"error": {"message": "not found"}}')
                return
            self._act(owner.next_action(body))
        except (OSError, ValueError):
            pass  # the client went away (timeouts are part of the tests)
        finally:
            with owner.lock:
                owner.in_flight -= 1

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def _act(self, action: Action) -> None:
        owner = self.owner
        if action.get("delay"):
            if owner.stop_event.wait(float(action["delay"])):
                return
        if action.get("hang"):
            owner.stop_event.wait(60)
            self.close_connection = True
            return
        if action.get("reset"):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        if "status" in action:
            err = json.dumps({"error": {"message": f"scripted {action['status']}", "type": "test"}}).encode()
            self._send(int(action["status"]), err, action.get("headers"))
            return
        if "raw" in action:
            self._send(200, action["raw"])
            return
        if "oversized" in action:
            n = int(action["oversized"])
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            if not action.get("chunked"):
                self.send_header("Content-Length", str(n))
            self.end_headers()
            chunk = b" " * 65536
            sent = 0
            while sent < n and not owner.stop_event.is_set():
                part = chunk[: min(len(chunk), n - sent)]
                self.wfile.write(part)
                sent += len(part)
            self.close_connection = True
            return
        if "trickle" in action:
            body = completion_body(action.get("content", "ok\nVerdict: correct"))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.flush()
            for i in range(len(body)):
                if owner.stop_event.wait(float(action["trickle"])):
                    return
                self.wfile.write(body[i : i + 1])
                self.wfile.flush()
            return
        self._send(200, completion_body(str(action.get("content", "")), *action.get("usage", (11, 7))))


def tiny_model_responder(max_new_tokens: int = 12) -> Callable[[dict], Action]:
    """Answer with the tiny in-repo Llama (untrained; generation just has to run). Thread-safe."""
    import torch

    from critique_rl.models import build_tiny_model, build_tiny_tokenizer
    from critique_rl.tasks.arithmetic import make_addition

    texts = [r["prompt"] + r["answer"] for r in make_addition("train", 200, 0)]
    texts += ["Verdict: correct", "Verdict: incorrect", "Question Response Critique"]
    tokenizer = build_tiny_tokenizer(texts, vocab_size=300)
    model = build_tiny_model(tokenizer, hidden_size=64, layers=1, heads=2, max_positions=1024).eval()
    lock = threading.Lock()

    def respond(body: dict) -> Action:
        prompt = "\n".join(str(m.get("content", "")) for m in body.get("messages", []))
        ids = tokenizer(prompt, return_tensors="pt").input_ids[:, -(1024 - max_new_tokens) :]
        with lock, torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[0, ids.shape[1] :]
        text = tokenizer.decode(new, skip_special_tokens=True) or "(nothing)"
        return {"content": text, "usage": (int(ids.shape[1]), int(new.shape[0]))}

    return respond


def addition_responder(right: str, wrong: str, usage: tuple[int, int] = (60, 12)) -> Callable[[dict], Action]:
    """An API critic stand-in for two-number additions: it reads ``Question:`` / ``Response:`` from the last
    message, recomputes the sum and replies ``right``, or ``wrong`` formatted with ``a``, ``b`` and ``sum``."""
    import re

    def respond(body: dict) -> Action:
        prompt = body["messages"][-1]["content"]
        question = prompt.split("Question:\n", 1)[1].split("\n", 1)[0]
        response = prompt.split("Response:\n", 1)[1].split("\n", 1)[0].strip()
        a, b = (int(x) for x in re.findall(r"\d+", question)[:2])
        digits = re.findall(r"-?\d+", response)
        ok = bool(digits) and int(digits[-1]) == a + b
        return {"content": right if ok else wrong.format(a=a, b=b, sum=a + b), "usage": usage}

    return respond
