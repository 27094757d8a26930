"""OpenAI-compatible critic: the official ``openai`` AsyncOpenAI client against any ``base_url``
(api.openai.com, a vLLM server, ...).

Client behaviour, all bounded so that a critique never stalls or breaks training:

- at most ``max_concurrency`` requests in flight (an ``asyncio.Semaphore`` per event loop);
- each attempt is bounded by ``timeout_s`` twice: the HTTP client's timeout *and* ``asyncio.wait_for``,
  so a server dribbling bytes slower than the timeout cannot keep a request alive;
- ``max_retries`` retries on timeouts, connection errors, 408/409/429/5xx, malformed or empty replies, with
  exponential backoff and full jitter (``uniform(0, min(backoff_max_s, backoff_base_s * 2**n))``); a
  ``Retry-After`` (or ``retry-after-ms``) header is honoured, capped at ``backoff_max_s``. The openai client's
  own retries are off (``max_retries=0``) so this is the only retry loop;
- replies larger than ``max_response_bytes`` are rejected while streaming (no unbounded reads);
- replies are cached on disk (:mod:`critique_rl.critics.cache`), keyed by (model, messages, params);
- a circuit breaker backs off a dead endpoint: after ``circuit_breaker_failures`` requests in a row failed
  (after their retries), requests fail at once with no network call for ``circuit_breaker_cooldown_s``, then
  one probe request is let through (success closes the circuit, failure opens it again).

The API key is read from the environment variable named by ``api_key_env``. It is never logged, cached,
stored in a repr, or included in an error message.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import random
import threading
import time
import weakref
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from critique_rl.critics.base import BaseCritic, CritiqueFailure, CritiqueRequest, Generation, custom_prompt
from critique_rl.critics.cache import CritiqueCache, cache_key
from critique_rl.errors import UserError
from critique_rl.primitives import DEFAULT_BASE_URL, safe_url  # noqa: F401 (re-exported)
from critique_rl.templates import render

logger = logging.getLogger("critique_rl.critics")

LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "0.0.0.0", "host.docker.internal"})
DUMMY_API_KEY = "EMPTY"
_RETRYABLE_STATUS = frozenset({408, 409, 425, 429})


def resolve_api_key(api_key_env: str, base_url: str | None) -> str:
    """The key from ``$api_key_env``; a dummy key for a non-OpenAI server; UserError for api.openai.com."""
    key = os.environ.get(api_key_env, "").strip()
    if key:
        return key
    host = (urlsplit(base_url or DEFAULT_BASE_URL).hostname or "").lower()
    if host == "openai.com" or host.endswith(".openai.com"):
        raise UserError(
            f"the openai critic needs an API key for {host}: set the environment variable {api_key_env} "
            "(or point critic.api_key_env at the variable that holds it)"
        )
    if host not in LOCAL_HOSTS:
        logger.warning("critic: $%s is not set; sending a dummy API key to %s", api_key_env, host)
    return DUMMY_API_KEY


def parse_retry_after(headers: Any) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date), else None."""
    if headers is None:
        return None
    try:
        ms = headers.get("retry-after-ms")
        if ms is not None:
            return max(0.0, float(ms) / 1000.0)
    except (TypeError, ValueError):
        pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        pass
    try:
        when = email.utils.parsedate_to_datetime(str(value))
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


class _AttemptError(Exception):
    """One failed attempt: a short, secret-free reason, whether to retry, and any Retry-After."""

    def __init__(self, reason: str, retryable: bool = True, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.retry_after = retry_after


class OpenAICritic(BaseCritic):
    """Critiques from an OpenAI-compatible chat endpoint (``cot``); rule critiques for the other kinds.

    Args:
        model: model name on the server, e.g. ``gpt-4o-mini`` or the vLLM served model name.
        kind: ``cot`` (default; the model writes the critique) or ``indicative``/``ground_truth`` (rule
            templates, no request is made).
        base_url: e.g. ``http://127.0.0.1:8000/v1``; None = api.openai.com.
        api_key_env: environment variable holding the key (see :func:`resolve_api_key`).
        cache_path: SQLite cache file; None = no cache.
        regen_temperature: sampling temperature for regenerations when ``temperature`` is 0, so a
            deterministic critic can change its mind (the cache key includes the regeneration index).
        max_response_bytes: largest accepted reply body; None = 1 MiB + 64 bytes per ``max_tokens``.
        system_prompt: optional system message before the ``critique_cot.j2`` user message.
        verdict_pattern: extra verdict regex with one group (``critic.verdict_pattern``), see
            :func:`critique_rl.critics.base.parse_verdict`.
        reference: ``visible`` (the prompt shows the reference answer when there is one) or ``hidden``
            (question and response only; ``critic.reference``).
    """

    def __init__(
        self,
        model: str,
        *,
        kind: str = "cot",
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        temperature: float = 0.0,
        max_tokens: int = 256,
        max_concurrency: int = 8,
        timeout_s: float = 30.0,
        max_retries: int = 3,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 8.0,
        cache_path: str | Path | None = None,
        max_regenerations: int = 2,
        fallback_kind: str = "auto",
        template_dir: str | None = None,
        verdict_pattern: str | None = None,
        regen_temperature: float = 0.7,
        max_response_bytes: int | None = None,
        system_prompt: str | None = None,
        circuit_breaker_failures: int = 5,
        circuit_breaker_cooldown_s: float = 30.0,
        reference: str = "visible",
    ) -> None:
        super().__init__(
            kind, fallback_kind=fallback_kind, max_regenerations=max_regenerations, template_dir=template_dir,
            verdict_pattern=verdict_pattern, reference=reference,
        )
        if not model:
            raise UserError("the openai critic needs a model name (critic.model), e.g. gpt-4o-mini")
        if max_concurrency < 1 or timeout_s <= 0 or max_retries < 0 or max_tokens < 1:
            raise UserError(
                "openai critic: max_concurrency >= 1, timeout_s > 0, max_retries >= 0 and max_tokens >= 1 "
                f"are required (got {max_concurrency}, {timeout_s}, {max_retries}, {max_tokens})"
            )
        self.model = model
        self.base_url = base_url
        self.api_key_env = api_key_env
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)
        self.max_concurrency = int(max_concurrency)
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_base_s = float(backoff_base_s)
        self.backoff_max_s = float(backoff_max_s)
        self.regen_temperature = float(regen_temperature)
        self.max_response_bytes = int(max_response_bytes or (1 << 20) + 64 * self.max_tokens)
        self.system_prompt = system_prompt
        self.url = safe_url(base_url)
        self._api_key = resolve_api_key(api_key_env, base_url) if kind == "cot" else DUMMY_API_KEY
        self._cache = CritiqueCache(cache_path) if cache_path else None
        self.circuit_breaker_failures = max(0, int(circuit_breaker_failures))
        self.circuit_breaker_cooldown_s = float(circuit_breaker_cooldown_s)
        self.last_error: str | None = None
        """Reason of the most recent failed request (short, secret-free), for warnings."""
        self._breaker_lock = threading.Lock()
        self._failures_in_a_row = 0
        self._open_until = 0.0
        self._probing = False
        self._short_circuited = 0
        self._semaphores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAICritic(model={self.model!r}, kind={self.kind!r}, base_url={self.url!r})"

    # -- resources -------------------------------------------------------------------------------------
    async def aclose(self) -> None:
        """Close the on-disk cache."""
        if self._cache is not None:
            self._cache.close()
            self._cache = None

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        sem = self._semaphores.get(loop)
        if sem is None:
            sem = self._semaphores[loop] = asyncio.Semaphore(self.max_concurrency)
        return sem

    def _client(self) -> Any:
        from openai import AsyncOpenAI

        return AsyncOpenAI(
            api_key=self._api_key, base_url=self.base_url or DEFAULT_BASE_URL, max_retries=0, timeout=self.timeout_s
        )

    # -- circuit breaker -------------------------------------------------------------------------------
    def _circuit_gate(self) -> tuple[str | None, bool]:
        """``(None, probe)`` when a request may go out (closed circuit, or the one probe after the cooldown, then
        ``probe`` is True); ``(reason, False)`` when the circuit is open."""
        if not self.circuit_breaker_failures:
            return None, False
        with self._breaker_lock:
            if self._failures_in_a_row < self.circuit_breaker_failures:
                return None, False
            now = time.monotonic()
            # a probe that never reported back (cancelled) stops blocking after its longest possible run
            stale = now >= self._open_until + (self.max_retries + 1) * (self.timeout_s + self.backoff_max_s)
            if now >= self._open_until and (not self._probing or stale):
                self._probing = True  # half-open: this request probes the endpoint
                return None, True
            self._short_circuited += 1
            wait = max(0.0, self._open_until - now)
            return (f"circuit open after {self._failures_in_a_row} failed requests in a row to {self.url} "
                    f"(last: {self.last_error}); next try in {wait:.0f}s"), False

    def _record_outcome(self, ok: bool, reason: str | None = None) -> None:
        with self._breaker_lock:
            self._probing = False
            if ok:
                self._failures_in_a_row = 0
                return
            self.last_error = reason
            self._failures_in_a_row += 1
            if self.circuit_breaker_failures and self._failures_in_a_row >= self.circuit_breaker_failures:
                if self._open_until <= time.monotonic():
                    logger.warning("critic at %s: %d requests in a row failed (last: %s); backing off for %gs",
                                   self.url, self._failures_in_a_row, reason, self.circuit_breaker_cooldown_s)
                self._open_until = time.monotonic() + self.circuit_breaker_cooldown_s

    def metrics(self, reset: bool = False) -> dict[str, float]:
        """:meth:`BaseCritic.metrics` plus ``critic/short_circuited`` (requests refused by the open circuit) and
        ``critic/circuit_open`` (1 while the circuit is open)."""
        out = super().metrics(reset)
        with self._breaker_lock:
            out["critic/short_circuited"] = float(self._short_circuited)
            opened = self.circuit_breaker_failures and self._failures_in_a_row >= self.circuit_breaker_failures
            out["critic/circuit_open"] = 1.0 if opened else 0.0
            if reset:
                self._short_circuited = 0
        return out

    # -- prompting -------------------------------------------------------------------------------------
    def messages(self, request: CritiqueRequest) -> list[dict[str, str]]:
        """The chat messages for ``request``: ``critique_cot.j2`` (or the request's own ``metadata["prompt"]``)
        as the user turn."""
        prompt = custom_prompt(request) or render(
            "critique_cot.j2",
            self.template_dir,
            question=request.question,
            response=request.response,
            reference=self.critic_reference(request),
        )
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        msgs.append({"role": "user", "content": prompt})
        return msgs

    def prompt_key(self, request: CritiqueRequest) -> str:
        """The chat messages as canonical JSON (see :meth:`BaseCritic.remember`)."""
        return json.dumps(self.messages(request), sort_keys=True, ensure_ascii=False)

    def backoff_delay(self, retry_index: int, retry_after: float | None = None) -> float:
        """Seconds before retry ``retry_index`` (0-based): Retry-After capped at ``backoff_max_s`` when the
        server sent one, else full jitter ``uniform(0, min(backoff_max_s, backoff_base_s * 2**retry_index))``."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.backoff_max_s)
        cap = min(self.backoff_max_s, self.backoff_base_s * (2.0**retry_index))
        return random.uniform(0.0, max(cap, 0.0))

    # -- generation ------------------------------------------------------------------------------------
    async def _generate(self, items: list[tuple[CritiqueRequest, int]]) -> list[Generation | CritiqueFailure]:
        sem = self._semaphore()
        async with self._client() as client:
            return list(await asyncio.gather(*(self._one(client, sem, req, regen) for req, regen in items)))

    async def _one(self, client: Any, sem: asyncio.Semaphore, request: CritiqueRequest, regen: int) -> Generation | CritiqueFailure:
        t0 = time.perf_counter()
        try:
            return await self._one_inner(client, sem, request, regen, t0)
        except Exception as exc:  # never raise into training
            reason = f"unexpected {type(exc).__name__}"
            logger.warning("critic request to %s failed: %s", self.url, reason)
            self._record_outcome(False, reason)
            return CritiqueFailure(reason, time.perf_counter() - t0)

    async def _one_inner(
        self, client: Any, sem: asyncio.Semaphore, request: CritiqueRequest, regen: int, t0: float
    ) -> Generation | CritiqueFailure:
        messages = self.messages(request)
        temperature = self.temperature if regen == 0 or self.temperature > 0 else self.regen_temperature
        params = {"temperature": temperature, "max_tokens": self.max_tokens, "regeneration": regen}
        key = cache_key(self.model, messages, params)
        if self._cache is not None:
            hit = self._cache.get(key)
            if hit is not None:
                logger.debug("critic cache hit %s", key[:12])
                return Generation(hit[0], hit[1], hit[2], latency_s=time.perf_counter() - t0, cached=True)
        last: _AttemptError | None = None
        probe = False
        for attempt in range(self.max_retries + 1):
            if attempt:
                assert last is not None
                delay = self.backoff_delay(attempt - 1, last.retry_after)
                self.stats.add("retries")
                logger.debug("critic retry %d/%d in %.3fs after: %s", attempt, self.max_retries, delay, last.reason)
                await asyncio.sleep(delay)
            try:
                async with sem:
                    # the breaker is checked right before each try (after waiting for a slot): requests queued
                    # behind the failures that opened it never reach the server; the probe keeps its retries
                    if not probe:
                        blocked, probe = self._circuit_gate()
                        if blocked is not None:
                            return CritiqueFailure(blocked, time.perf_counter() - t0)
                    logger.debug("critic request to %s model=%s attempt=%d", self.url, self.model, attempt + 1)
                    text, p_tok, c_tok = await asyncio.wait_for(
                        self._post(client, messages, temperature), timeout=self.timeout_s
                    )
            except _AttemptError as exc:
                last = exc
            except Exception as exc:
                last = self._classify(exc)
            else:
                self._record_outcome(True)
                if self._cache is not None:
                    critique_req = custom_prompt(request) is None  # a free-form prompt is no critique pair
                    self._cache.put(key, self.model, text, p_tok, c_tok, request=request if critique_req else None,
                                    regeneration=regen if critique_req else None,
                                    reference_shown=(self.critic_reference(request) is not None) if critique_req else None)
                return Generation(text, p_tok, c_tok, latency_s=time.perf_counter() - t0)
            logger.info("critic request to %s failed (attempt %d): %s", self.url, attempt + 1, last.reason)
            if not last.retryable:
                break
        assert last is not None
        tries = attempt + 1
        reason = last.reason if tries == 1 else f"{last.reason} ({tries} tries)"
        self._record_outcome(False, reason)
        return CritiqueFailure(reason, time.perf_counter() - t0)

    def _classify(self, exc: BaseException) -> _AttemptError:
        """Map a client/transport exception to a short, secret-free reason."""
        import openai

        if isinstance(exc, (asyncio.TimeoutError, TimeoutError, openai.APITimeoutError)):
            return _AttemptError(f"timeout after {self.timeout_s:g}s")
        if isinstance(exc, openai.APIStatusError):
            status = int(exc.status_code)
            retry_after = parse_retry_after(getattr(exc.response, "headers", None))
            retryable = status in _RETRYABLE_STATUS or status >= 500
            label = {401: "unauthorized", 403: "forbidden", 404: "not found", 429: "rate limited"}.get(status, "")
            return _AttemptError(f"HTTP {status} {label}".strip(), retryable, retry_after)
        if isinstance(exc, openai.APIConnectionError):
            return _AttemptError(f"connection error ({self.url})")
        if isinstance(exc, openai.OpenAIError):
            return _AttemptError(f"client error {type(exc).__name__}")
        name = type(exc).__name__
        if "timeout" in name.lower():
            return _AttemptError(f"timeout after {self.timeout_s:g}s")
        # httpx transport errors raised while reading the body (reset, incomplete chunked body...)
        return _AttemptError(f"connection error ({name})")

    async def _post(self, client: Any, messages: list[dict[str, str]], temperature: float) -> tuple[str, int, int]:
        """One request; reads the body incrementally so an oversized reply is cut off early."""
        cap = self.max_response_bytes
        async with client.chat.completions.with_streaming_response.create(
            model=self.model, messages=messages, temperature=temperature, max_tokens=self.max_tokens
        ) as resp:
            length = resp.headers.get("content-length")
            if length and length.isdigit() and int(length) > cap:
                raise _AttemptError(f"oversized reply ({int(length)} bytes > {cap})", retryable=False)
            body = bytearray()
            async for chunk in resp.iter_bytes():
                body.extend(chunk)
                if len(body) > cap:
                    raise _AttemptError(f"oversized reply (> {cap} bytes)", retryable=False)
        try:
            data = json.loads(bytes(body))
        except ValueError:
            raise _AttemptError("malformed reply (not JSON)") from None
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise _AttemptError("malformed reply (no choices[0].message.content)") from None
        if not isinstance(content, str) or not content.strip():
            raise _AttemptError("empty content")
        usage = data.get("usage") if isinstance(data, dict) else None
        usage = usage if isinstance(usage, dict) else {}
        return content, _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens"))


def _int(value: Any) -> int:
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0
