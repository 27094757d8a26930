"""Critic protocol: batched requests in, critiques out (Critique-GRPO, arXiv:2506.03106).

Three kinds of critique (paper, Sec. 3):

- ``indicative``: the verdict only ("Your answer 84 is incorrect.").
- ``ground_truth``: the verdict plus the reference answer ("... The correct answer is 85.").
- ``cot``: a step-by-step critique written by a model that ends in a parseable verdict line
  (``Verdict: correct`` / ``Verdict: incorrect``, or the paper's ``Conclusion: right`` / ``Conclusion:
  wrong``, or a user regex ``critic.verdict_pattern``; see :func:`parse_verdict`). When the verifier's verdict is known and the critic's
  disagrees (or cannot be parsed), the critique is regenerated up to ``max_regenerations`` times and then
  replaced by the fallback kind.

Failure policy: a critique that cannot be had never raises into training. It is replaced by a rule critique
of the fallback kind (``auto`` = ``ground_truth`` when a reference exists, else ``indicative``), marked
``fallback=True`` with a short ``error``, and counted in :meth:`BaseCritic.metrics`.

Critic text is data: it is only ever rendered as a template *variable* (jinja2 sandbox), never compiled,
evaluated, passed to a shell or used as a path.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

from critique_rl.critics.stats import VERDICT_COUNTERS, CriticStats, verdict_scores
from critique_rl.templates import render

logger = logging.getLogger("critique_rl.critics")

CritiqueKind = Literal["indicative", "ground_truth", "cot"]
KINDS: tuple[str, ...] = ("indicative", "ground_truth", "cot")
FALLBACK_KINDS: tuple[str, ...] = ("auto", "ground_truth", "indicative")

_T = TypeVar("_T")


@dataclass
class CritiqueRequest:
    """What a critic sees: the question, the policy's response, and what the verifier knows."""

    question: str
    response: str
    reference: str | None = None
    """Reference answer, when the task has one (needed by `ground_truth` critiques)."""
    verdict: bool | None = None
    """The verifier's verdict on the response, when known."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form extras. ``metadata["answer"]``, when set, is the response's parsed final answer (e.g. from
    ``Task.extract``) and is quoted by rule critiques; otherwise the final-answer span is used."""


@dataclass
class Critique:
    """A critic's answer. ``fallback`` is True when the configured kind could not be had."""

    text: str
    verdict: bool | None
    kind: str
    latency_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    fallback: bool = False
    error: str | None = None
    regenerations: int = 0
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (used by the CLI and logs)."""
        return {
            "text": self.text,
            "verdict": self.verdict,
            "kind": self.kind,
            "fallback": self.fallback,
            "error": self.error,
            "latency": round(self.latency_s, 4),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "regenerations": self.regenerations,
            "cached": self.cached,
        }


@runtime_checkable
class Critic(Protocol):
    """Anything with batched ``critique`` (and ``acritique``) is a critic."""

    kind: str

    def critique(self, requests: list[CritiqueRequest]) -> list[Critique]: ...

    async def acritique(self, requests: list[CritiqueRequest]) -> list[Critique]: ...

    def metrics(self) -> dict[str, float]: ...


# ----------------------------------------------------------------------------------------------------------
# verdict parsing and rule rendering (shared by every backend and by the fallback path)

_VERDICT = re.compile(
    r"\b(?:verdict|conclusion)\s*[:=\-]?\s*[*_`\"'\[(]*\s*(incorrect|correct|wrong|right|false|true)\b",
    re.IGNORECASE,
)
_POSITIVE = {"correct", "right", "true", "yes", "pass", "passed", "accept", "accepted", "valid", "1"}
_NEGATIVE = {"incorrect", "wrong", "false", "no", "fail", "failed", "reject", "rejected", "invalid", "0"}


def compile_verdict_pattern(pattern: str | re.Pattern[str] | None) -> re.Pattern[str] | None:
    """Compile a user verdict regex (case-insensitive); it needs at least one capturing group, the verdict
    word. Raises ``ValueError`` naming the problem."""
    if pattern is None or isinstance(pattern, re.Pattern):
        return pattern
    try:
        compiled = re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression ({exc})") from None
    if compiled.groups < 1:
        raise ValueError("needs one capturing group around the verdict word, e.g. 'Grade:\\s*(pass|fail)'")
    return compiled


def _verdict_word(word: str | None) -> bool | None:
    w = (word or "").strip().strip("*_`\"'.[]()").lower()
    return True if w in _POSITIVE else False if w in _NEGATIVE else None


def parse_verdict(text: str, pattern: str | re.Pattern[str] | None = None) -> bool | None:
    """The verdict a ``cot`` critique ends in: the last ``Verdict: correct|incorrect`` or
    ``Conclusion: right|wrong`` (the Critique-GRPO paper's CoT critique form, arXiv:2506.03106) in ``text``.

    Also accepts ``right/wrong`` and ``true/false`` after either keyword, and light markdown
    (``**Verdict:** incorrect``). ``pattern`` (``critic.verdict_pattern``): a regex whose first group
    captures the verdict word, tried first (its last match wins; ``correct/right/true/yes/pass/accepted/
    valid/1`` and ``incorrect/wrong/false/no/fail/rejected/invalid/0``, any case, are understood); when it
    does not match, the built-in forms are used. Returns None when there is no verdict.
    """
    text = text or ""
    compiled = compile_verdict_pattern(pattern)
    if compiled is not None:
        found = [m.group(1) for m in compiled.finditer(text)]
        if found:
            verdict = _verdict_word(found[-1])
            if verdict is not None:
                return verdict
    found = _VERDICT.findall(text)
    if not found:
        return None
    return found[-1].lower() in _POSITIVE


def response_answer(request: CritiqueRequest, max_chars: int = 40) -> str:
    """The short answer a rule critique quotes: ``metadata["answer"]`` or the response's final-answer span."""
    answer = request.metadata.get("answer") if request.metadata else None
    if answer is None:
        from critique_rl.primitives import final_answer_span

        answer = final_answer_span(request.response or "")
    answer = " ".join(str(answer).split())
    if len(answer) > max_chars:
        answer = answer[: max_chars - 3].rstrip() + "..."
    return answer


def resolve_fallback_kind(fallback_kind: str, request: CritiqueRequest) -> str:
    """``auto`` -> ``ground_truth`` when the request has a reference, else ``indicative``.

    ``ground_truth`` without a reference degrades to ``indicative`` (there is nothing to quote).
    """
    if fallback_kind == "indicative":
        return "indicative"
    return "ground_truth" if request.reference not in (None, "") else "indicative"


def render_rule(kind: str, request: CritiqueRequest, template_dir: str | None = None) -> str:
    """Render the rule critique of ``kind`` (``indicative`` or ``ground_truth``) for ``request``."""
    if kind not in ("indicative", "ground_truth"):
        raise ValueError(f"rule critiques are indicative or ground_truth, not {kind!r}")
    return render(
        f"critique_{kind}.j2",
        template_dir,
        answer=response_answer(request),
        verdict=request.verdict,
        reference=request.reference if request.reference not in (None, "") else None,
        question=request.question,
    )


def custom_prompt(request: CritiqueRequest) -> str | None:
    """``metadata["prompt"]`` when the caller supplies its own prompt (e.g. lesson abstraction with
    ``lesson.j2``): model critics then send it verbatim and return the raw reply (kind ``prompt``, no verdict
    check); None for an ordinary critique request."""
    prompt = request.metadata.get("prompt") if request.metadata else None
    return prompt if isinstance(prompt, str) and prompt.strip() else None


def short_error(reason: str, max_chars: int = 160) -> str:
    """One line, at most ``max_chars`` characters."""
    line = " ".join(str(reason).split())
    return line if len(line) <= max_chars else line[: max_chars - 3] + "..."


# ----------------------------------------------------------------------------------------------------------
# the shared base class


@dataclass
class Generation:
    """One model reply (used by model backends): text, usage, latency, cache flag."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    cached: bool = False


class CritiqueFailure(Exception):
    """A generation that could not be had; ``reason`` is short and safe to log (no secrets)."""

    def __init__(self, reason: str, latency_s: float = 0.0) -> None:
        super().__init__(reason)
        self.reason = short_error(reason)
        self.latency_s = latency_s


def run_sync(make_coro: Callable[[], Awaitable[_T]]) -> _T:
    """Run a coroutine from sync code: ``asyncio.run`` when no loop runs in this thread, else in a worker
    thread with its own loop (so ``critique()`` also works inside Jupyter or an async framework)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make_coro())  # type: ignore[arg-type]
    box: dict[str, Any] = {}

    def worker() -> None:
        try:
            box["value"] = asyncio.run(make_coro())  # type: ignore[arg-type]
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    t = threading.Thread(target=worker, name="critique-rl-critic", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


class BaseCritic:
    """Shared machinery: kinds, fallback, cot verdict checking with regeneration, metrics, sync wrapper.

    Model backends implement :meth:`_generate`, which returns one :class:`Generation` or
    :class:`CritiqueFailure` per item of a batch; everything else is here.
    """

    kind: str

    def __init__(
        self,
        kind: str = "ground_truth",
        *,
        fallback_kind: str = "auto",
        max_regenerations: int = 2,
        template_dir: str | None = None,
        verdict_pattern: str | re.Pattern[str] | None = None,
        reference: str = "visible",
    ) -> None:
        if reference not in ("visible", "hidden"):
            raise ValueError(f"critic reference must be 'visible' or 'hidden', got {reference!r}")
        if kind not in KINDS:
            raise ValueError(f"critic kind must be one of {KINDS}, got {kind!r}")
        if fallback_kind not in FALLBACK_KINDS:
            raise ValueError(f"critic fallback_kind must be one of {FALLBACK_KINDS}, got {fallback_kind!r}")
        if max_regenerations < 0:
            raise ValueError(f"critic max_regenerations must be >= 0, got {max_regenerations}")
        self.kind = kind
        self.fallback_kind = fallback_kind
        self.max_regenerations = max_regenerations
        self.template_dir = template_dir
        self.verdict_pattern = verdict_pattern  # type: ignore[assignment]  # compiled by the setter
        self.stats = CriticStats()
        self.reference = reference
        """``visible``: model critics see the reference answer; ``hidden``: question and response only."""
        self._verdict_window = dict.fromkeys(VERDICT_COUNTERS, 0)
        self._memo: OrderedDict[str, Generation] = OrderedDict()
        self.memo_size = 10_000

    def critic_reference(self, request: CritiqueRequest) -> str | None:
        """The reference answer as the critic's prompt shows it: None when hidden or absent."""
        if self.reference == "hidden" or request.reference in (None, ""):
            return None
        return request.reference

    def prompt_key(self, request: CritiqueRequest) -> str | None:
        """The exact prompt a model backend sends for ``request`` (None: no model prompt). Two requests with
        the same key get the same first-try reply; see :meth:`remember`."""
        return None

    def remember(self, request: CritiqueRequest, critique: Critique) -> None:
        """Keep a finished model critique so the next critique of the same prompt (same :meth:`prompt_key`)
        reuses it as its first try instead of calling the model again: the critic-as-judge reward writes the
        critique once and the critique stage of the same step reads it (a cache hit, counted in
        ``critic/cache_hits``). Fallback and rule critiques are not kept. Bounded (``memo_size``, oldest out)."""
        key = self.prompt_key(request)
        if key is None or critique.fallback or critique.kind != "cot":
            return
        self._memo[key] = Generation(critique.text, critique.prompt_tokens, critique.completion_tokens, cached=True)
        self._memo.move_to_end(key)
        while len(self._memo) > self.memo_size:
            self._memo.popitem(last=False)

    @property
    def verdict_pattern(self) -> re.Pattern[str] | None:
        """Extra verdict regex for ``cot`` critiques (``critic.verdict_pattern``), see :func:`parse_verdict`."""
        return self._verdict_pattern

    @verdict_pattern.setter
    def verdict_pattern(self, pattern: str | re.Pattern[str] | None) -> None:
        try:
            self._verdict_pattern = compile_verdict_pattern(pattern)
        except ValueError as exc:
            raise ValueError(f"critic verdict_pattern {pattern!r}: {exc}") from None

    # -- public API ------------------------------------------------------------------------------------
    def critique(self, requests: list[CritiqueRequest]) -> list[Critique]:
        """Critique a batch from sync code (runs an event loop internally). Never raises for a failed
        critique: failures come back as fallback critiques."""
        return run_sync(lambda: self.acritique(requests))

    async def acritique(self, requests: list[CritiqueRequest]) -> list[Critique]:
        """Critique a batch. Non-``cot`` kinds are rule critiques (no model call); requests carrying a
        free-form ``metadata["prompt"]`` are answered verbatim by the model (see :func:`custom_prompt`)."""
        requests = list(requests)
        out: list[Critique | None] = [None] * len(requests)
        free = [i for i, r in enumerate(requests) if custom_prompt(r) is not None]
        free_set = set(free)
        rest = [i for i in range(len(requests)) if i not in free_set]
        cot = [i for i in rest if self.kind == "cot"]
        for i in rest:
            if self.kind != "cot":
                out[i] = self._rule_critique(requests[i], self.kind)
        if cot:
            try:
                done = await self._cot_batch([requests[i] for i in cot])
            except Exception as exc:  # last line of defence: never raise into training
                logger.warning("critic backend failed for a batch of %d: %s", len(cot), type(exc).__name__)
                reason = short_error(f"{type(exc).__name__}: {exc}")
                done = [self.fallback(requests[i], reason) for i in cot]
                self.stats.add("errors", len(cot))
            for i, c in zip(cot, done, strict=True):
                out[i] = c
        if free:
            for i, c in zip(free, await self._free_batch([requests[i] for i in free]), strict=True):
                out[i] = c
        for c in out:
            assert c is not None
            self.stats.record(c)
        return out  # type: ignore[return-value]

    def metrics(self, reset: bool = False) -> dict[str, float]:
        """``critic/requests, errors, fallbacks, cache_hits, latency_p50, latency_p95, verdict_disagreements,
        regenerations, prompt_tokens, completion_tokens`` (plus ``retries``, ``unparsable_verdicts``),
        cumulative since construction or the last ``reset``, with the verdict counters ``critic/verdicts_checked,
        verdicts_agreed, wrong_flagged, right_flagged, wrong_missed``; and over the critiques since the previous
        call (the trainer calls it once per step: per-step values) ``critique/verdict_accuracy``,
        ``critique/verdict_precision_wrong``, ``critique/verdict_recall_wrong`` (first-try cot verdicts against
        the verifier's, see :func:`verdict_scores`; None when there were none) and ``critique/verdicts_checked``."""
        out = self.stats.as_dict()
        counts = {k: int(out[f"critic/{k}"]) for k in VERDICT_COUNTERS}
        window = {k: counts[k] - self._verdict_window.get(k, 0) for k in VERDICT_COUNTERS}
        self._verdict_window = counts
        for name, value in verdict_scores(*(window[k] for k in VERDICT_COUNTERS)).items():
            out[f"critique/verdict_{name}"] = value  # type: ignore[assignment]  # since the previous read
        out["critique/verdicts_checked"] = float(window["verdicts_checked"])
        if reset:
            self.stats.reset()
            self._verdict_window = dict.fromkeys(VERDICT_COUNTERS, 0)
        return out

    def fallback(self, request: CritiqueRequest, reason: str, *, latency_s: float = 0.0, **extra: Any) -> Critique:
        """The rule critique of the fallback kind, marked ``fallback=True`` with ``error=reason``."""
        kind = resolve_fallback_kind(self.fallback_kind, request)
        if self.reference == "hidden":  # the critic never sees the answer: neither may its fallback quote it
            kind = "indicative"
        return Critique(
            text=render_rule(kind, request, self.template_dir),
            verdict=request.verdict,
            kind=kind,
            latency_s=latency_s,
            fallback=True,
            error=short_error(reason),
            **extra,
        )

    async def aclose(self) -> None:
        """Release resources (cache connections...). Safe to call more than once."""

    def close(self) -> None:
        """Sync :meth:`aclose`."""
        run_sync(self.aclose)

    # -- internals -------------------------------------------------------------------------------------
    def _rule_critique(self, request: CritiqueRequest, kind: str) -> Critique:
        t0 = time.perf_counter()
        if kind == "ground_truth" and request.reference in (None, ""):
            return self.fallback(request, "no reference answer for a ground_truth critique")
        text = render_rule(kind, request, self.template_dir)
        return Critique(text=text, verdict=request.verdict, kind=kind, latency_s=time.perf_counter() - t0)

    async def _generate(self, items: list[tuple[CritiqueRequest, int]]) -> list[Generation | CritiqueFailure]:
        """Generate one cot critique per ``(request, regeneration_index)``; implemented by model backends."""
        raise NotImplementedError(f"{type(self).__name__} cannot write cot critiques")

    async def _generate_or_recall(self, items: list[tuple[CritiqueRequest, int]]) -> list[Generation | CritiqueFailure]:
        """:meth:`_generate`, except first tries whose prompt :meth:`remember` kept (a cached generation)."""
        out: list[Generation | CritiqueFailure | None] = [None] * len(items)
        if self._memo:
            for j, (req, regen) in enumerate(items):
                key = self.prompt_key(req) if regen == 0 else None
                if key is not None and key in self._memo:
                    out[j] = self._memo[key]
        todo = [j for j, g in enumerate(out) if g is None]
        if todo:
            for j, gen in zip(todo, await self._generate([items[j] for j in todo]), strict=True):
                out[j] = gen
        return out  # type: ignore[return-value]

    def _count_verdict(self, verdict: bool | None, truth: bool) -> None:
        """One first-try verdict against the verifier's (``critique/verdict_*``)."""
        self.stats.add("verdicts_checked")
        if verdict == truth:
            self.stats.add("verdicts_agreed")
        if verdict is False:
            self.stats.add("wrong_flagged" if not truth else "right_flagged")
        elif not truth:
            self.stats.add("wrong_missed")

    async def _free_batch(self, requests: list[CritiqueRequest]) -> list[Critique]:
        """Answer free-form prompts verbatim (kind ``prompt``, no verdict). A failure gives empty text with
        ``fallback=True`` and ``error`` set (a rule critique would not answer the prompt)."""
        try:
            gens = await self._generate([(r, 0) for r in requests])
        except NotImplementedError:
            gens = [CritiqueFailure(f"{type(self).__name__} cannot answer free-form prompts")] * len(requests)
        except Exception as exc:
            gens = [CritiqueFailure(f"{type(exc).__name__}: {exc}")] * len(requests)
        out = []
        for gen in gens:
            if isinstance(gen, CritiqueFailure):
                self.stats.add("errors")
                out.append(Critique(text="", verdict=None, kind="prompt", latency_s=gen.latency_s, fallback=True,
                                    error=gen.reason))
                continue
            if gen.cached:
                self.stats.add("cache_hits")
            else:
                self.stats.add("prompt_tokens", gen.prompt_tokens)
                self.stats.add("completion_tokens", gen.completion_tokens)
            out.append(Critique(text=gen.text.strip(), verdict=None, kind="prompt", latency_s=gen.latency_s,
                                prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens,
                                cached=gen.cached))
        return out

    async def _cot_batch(self, requests: list[CritiqueRequest]) -> list[Critique]:
        """Rounds of generation: round r regenerates the critiques whose verdict disagreed in round r-1."""
        results: list[Critique | None] = [None] * len(requests)
        spent = [0.0] * len(requests)
        p_tok = [0] * len(requests)
        c_tok = [0] * len(requests)
        all_cached = [True] * len(requests)
        pending = list(range(len(requests)))
        for round_idx in range(self.max_regenerations + 1):
            if not pending:
                break
            if round_idx:
                self.stats.add("regenerations", len(pending))
            gens = await self._generate_or_recall([(requests[i], round_idx) for i in pending])
            retry: list[int] = []
            for i, gen in zip(pending, gens, strict=True):
                req = requests[i]
                if isinstance(gen, CritiqueFailure):
                    spent[i] += gen.latency_s
                    self.stats.add("errors")
                    logger.info("critique failed, falling back: %s", gen.reason)
                    results[i] = self.fallback(
                        req, gen.reason, latency_s=spent[i], regenerations=round_idx,
                        prompt_tokens=p_tok[i], completion_tokens=c_tok[i],
                    )
                    continue
                spent[i] += gen.latency_s
                p_tok[i] += gen.prompt_tokens
                c_tok[i] += gen.completion_tokens
                all_cached[i] = all_cached[i] and gen.cached
                if gen.cached:
                    self.stats.add("cache_hits")
                else:  # only tokens actually paid for count towards the usage totals
                    self.stats.add("prompt_tokens", gen.prompt_tokens)
                    self.stats.add("completion_tokens", gen.completion_tokens)
                verdict = parse_verdict(gen.text, self.verdict_pattern)
                if round_idx == 0 and req.verdict is not None:
                    self._count_verdict(verdict, req.verdict)
                problem = None
                if verdict is None:
                    self.stats.add("unparsable_verdicts")
                    problem = "no parseable verdict in the cot critique"
                elif req.verdict is not None and verdict != req.verdict:
                    self.stats.add("verdict_disagreements")
                    problem = "cot verdict disagrees with the verifier"
                if problem is None:
                    results[i] = Critique(
                        text=gen.text.strip(), verdict=verdict, kind="cot", latency_s=spent[i],
                        prompt_tokens=p_tok[i], completion_tokens=c_tok[i], regenerations=round_idx,
                        cached=all_cached[i],
                    )
                elif round_idx < self.max_regenerations:
                    retry.append(i)
                else:
                    logger.info("%s after %d regenerations; falling back", problem, round_idx)
                    results[i] = self.fallback(
                        req, f"{problem} after {round_idx} regenerations", latency_s=spent[i],
                        regenerations=round_idx, prompt_tokens=p_tok[i], completion_tokens=c_tok[i],
                        cached=all_cached[i],
                    )
            pending = retry
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]
