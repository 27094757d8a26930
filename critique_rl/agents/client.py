"""A small client for ``critique-rl serve`` (stdlib HTTP; the chat calls work with the unchanged ``openai`` client).

::

    from critique_rl.agents.client import EpisodeClient

    hub = EpisodeClient("http://127.0.0.1:8000/v1", api_key=os.environ.get("CRITIQUE_RL_API_KEY"))
    while (ep := hub.next_task()) is not None:
        llm = hub.openai(ep.episode_id)          # an openai.OpenAI sending the X-Episode-Id header
        ... your agent loop: llm.chat.completions.create(model="policy", messages=...) ...
        hub.finish(ep.episode_id, reward=1.0 if solved else 0.0, feedback=None)

``chat(episode_id, messages)`` does the same call without the ``openai`` package.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any


class ServerError(RuntimeError):
    """A non-2xx answer: ``status``, and the server's ``message`` / ``code`` (OpenAI's error shape)."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.code = code


@dataclass(frozen=True)
class Episode:
    """A handed-out episode: play ``task`` and finish ``episode_id``."""

    episode_id: str
    task: dict[str, Any]
    group_id: str
    policy_version: int


class EpisodeClient:
    """``next_task()`` -> :class:`Episode` or None, ``chat(episode_id, messages)`` -> reply text,
    ``finish(episode_id, reward, success, feedback)``, ``stats()``; ``openai(episode_id)`` for an ``openai.OpenAI``
    client bound to one episode. ``api_key``: the server's bearer token (read it from the environment)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 120.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def __repr__(self) -> str:  # never shows the key
        return f"EpisodeClient({self.base_url!r})"

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None, timeout: float | None = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                raw = resp.read()
                return resp.status, (json.loads(raw) if raw else None)
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                err = json.loads(raw)["error"]
                raise ServerError(exc.code, str(err.get("message")), err.get("code")) from None
            except (ValueError, KeyError, TypeError):
                raise ServerError(exc.code, raw.decode(errors="replace")[:300]) from None

    def next_task(self, timeout: float = 30.0) -> Episode | None:
        """The next episode to play; None when the server hands none out within ``timeout`` seconds or training
        has ended (``while (ep := client.next_task()) is not None:`` ends with the run)."""
        try:
            status, got = self._request("POST", "/episodes/start", {"timeout": timeout},
                                        timeout=timeout + self.timeout)
        except ServerError as exc:
            if exc.status == 410:  # training has ended
                return None
            raise
        if status == 204 or got is None:
            return None
        return Episode(got["episode_id"], got["task"], got["group_id"], int(got["policy_version"]))

    def chat_response(self, episode_id: str | None, messages: list[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
        """The whole ``chat.completion`` JSON of one call (``kwargs``: ``max_tokens``, ``logprobs``, ...)."""
        headers = {"X-Episode-Id": episode_id} if episode_id else None
        _, got = self._request("POST", "/chat/completions", {"model": kwargs.pop("model", "policy"),
                                                              "messages": messages, **kwargs}, headers=headers)
        return got

    def chat(self, episode_id: str | None, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        """The reply text of one call recorded in ``episode_id`` (None: a plain, unrecorded call)."""
        return self.chat_response(episode_id, messages, **kwargs)["choices"][0]["message"]["content"]

    def finish(self, episode_id: str, reward: float, success: bool | None = None,
               feedback: str | None = None) -> dict[str, Any]:
        """Report the episode's return; ``{"episode_id", "accepted", "reason"}`` (not accepted: dropped as stale,
        its task is handed out again)."""
        _, got = self._request("POST", f"/episodes/{episode_id}/finish",
                               {"reward": reward, "success": success, "feedback": feedback})
        return got

    def stats(self) -> dict[str, Any]:
        return self._request("GET", "/episodes/stats")[1]

    def openai(self, episode_id: str | None = None, **kwargs: Any) -> Any:
        """An ``openai.OpenAI`` client for this server whose calls are recorded in ``episode_id`` (header
        ``X-Episode-Id``); ``kwargs`` go to ``OpenAI(...)``."""
        from openai import OpenAI

        headers = dict(kwargs.pop("default_headers", None) or {})
        if episode_id:
            headers["X-Episode-Id"] = episode_id
        return OpenAI(base_url=self.base_url, api_key=self.api_key or "EMPTY", default_headers=headers, **kwargs)
