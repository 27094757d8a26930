"""Memory records (SkillRL-style): a :class:`Demonstration` is a successful episode kept whole; a
:class:`Lesson` is a short, general statement abstracted from failures (what went wrong, what to do instead,
when it applies).

Records are plain dataclasses. ``key_text`` is what retrieval indexes, ``render`` is the short text that goes
into a prompt. All text here is data: it is rendered into templates only as variables.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from critique_rl.errors import UserError

Kind = Literal["demonstration", "lesson"]
KINDS: tuple[str, str] = ("demonstration", "lesson")

MAX_SOURCE_IDS = 1000
"""A lesson keeps at most this many source episode ids (the oldest are dropped first); ``merged`` keeps counting."""
MAX_EXAMPLE_CHARS = 200
"""A lesson's quoted situation (:attr:`Lesson.example`) is clipped to this many characters."""

_SPACE = re.compile(r"\s+")
_NUM = re.compile(r"\d+(?:\.\d+)?")


def new_id(kind: str) -> str:
    """A fresh record id: ``D-`` or ``L-`` followed by 10 hex digits (random, unique across processes)."""
    return ("D-" if kind == "demonstration" else "L-") + uuid.uuid4().hex[:10]


def normalize_text(text: str) -> str:
    """Lower-case, collapse whitespace; used for exact-duplicate hashing."""
    return _SPACE.sub(" ", text).strip().lower()


def text_hash(*parts: str) -> str:
    """Stable hash of normalized ``parts`` (exact-duplicate key)."""
    h = hashlib.sha1()
    for p in parts:
        h.update(normalize_text(p).encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def quote_example(text: str) -> str:
    """Whitespace collapsed and clipped to :data:`MAX_EXAMPLE_CHARS` (with '...' when clipped)."""
    one = _SPACE.sub(" ", text).strip()
    return one if len(one) <= MAX_EXAMPLE_CHARS else one[: MAX_EXAMPLE_CHARS - 3].rstrip() + "..."


def _strip_end(text: str) -> str:
    return text.strip().rstrip(".;:, ").strip()


@dataclass
class Demonstration:
    """A successful episode: the question and the full trajectory that solved it."""

    question: str
    trajectory: str
    reward: float = 0.0
    tags: tuple[str, ...] = ()
    source_run: str | None = None
    source_step: int | None = None
    id: str = ""
    retrieved: int = 0
    """How many times it was put into a prompt."""
    helped: int = 0
    """How many of those episodes then succeeded (see ``MemoryBank.credit``)."""
    merged: int = 0
    """Identical demonstrations recorded again (exact duplicates are counted, not stored twice)."""
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    lift: float = 0.0
    """Sum over the episodes whose prompt held it of (outcome - baseline outcome); see :attr:`usefulness`."""

    kind: Kind = field(default="demonstration", init=False)

    @property
    def usefulness(self) -> float:
        """Smoothed mean lift, ``lift / (retrieved + 2)`` (:func:`critique_rl.memory.store.usefulness`)."""
        return self.lift / (self.retrieved + 2.0)

    def __post_init__(self) -> None:
        self.tags = tuple(self.tags)
        if not self.id:
            self.id = new_id("demonstration")

    @property
    def key_text(self) -> str:
        """What retrieval indexes: the question (queries are questions too)."""
        return self.question

    @property
    def dedup_hash(self) -> str:
        """Exact-duplicate key: question and trajectory."""
        return text_hash(self.question, self.trajectory)

    def render(self) -> str:
        """Short prompt text: the question and its solved trajectory."""
        return f"Q: {self.question.strip()}\nA: {self.trajectory.strip()}"

    def payload(self) -> dict[str, Any]:
        """Kind-specific fields stored as JSON."""
        return {"question": self.question, "trajectory": self.trajectory, "reward": float(self.reward)}

    def to_dict(self) -> dict[str, Any]:
        """All fields as JSON-ready values (the export format)."""
        d = dataclasses.asdict(self)
        d["tags"] = list(self.tags)
        return d


@dataclass
class Lesson:
    """A general, reusable statement abstracted from one or more failed episodes."""

    situation: str
    """The trigger: when this lesson matters, e.g. 'When adding two-digit numbers whose ones digits sum to 10 or more'."""
    mistake: str
    """What went wrong."""
    instead: str
    """What to do instead."""
    applies_when: str = ""
    """The class of problems it applies to (used for retrieval)."""
    tags: tuple[str, ...] = ()
    source_ids: list[str] = field(default_factory=list)
    """Ids of the failed episodes it was abstracted from (merges append)."""
    source_run: str | None = None
    source_step: int | None = None
    id: str = ""
    merged: int = 0
    """How many later failures merged into this lesson instead of duplicating it."""
    retrieved: int = 0
    helped: int = 0
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    lift: float = 0.0
    """Sum over the episodes whose prompt held it of (outcome - baseline outcome); see :attr:`usefulness`."""
    example: str = ""
    """The situation it was written from, quoted: the question of the first failed episode (clipped to
    :data:`MAX_EXAMPLE_CHARS`), so a person can audit the lesson against a real case. Not part of the prompt
    text, the retrieval key or the dedup key."""

    kind: Kind = field(default="lesson", init=False)

    @property
    def usefulness(self) -> float:
        """Smoothed mean lift, ``lift / (retrieved + 2)`` (:func:`critique_rl.memory.store.usefulness`)."""
        return self.lift / (self.retrieved + 2.0)

    def __post_init__(self) -> None:
        self.tags = tuple(self.tags)
        self.source_ids = list(self.source_ids)[-MAX_SOURCE_IDS:]
        self.example = quote_example(self.example) if isinstance(self.example, str) else self.example
        if not self.id:
            self.id = new_id("lesson")

    @property
    def key_text(self) -> str:
        """What retrieval and dedup compare: all four statement fields."""
        return " ".join(p for p in (self.situation, self.applies_when, self.mistake, self.instead) if p)

    @property
    def dedup_hash(self) -> str:
        """Exact-duplicate key: the statement with numbers masked."""
        return text_hash(*(_NUM.sub("#", p) for p in (self.situation, self.mistake, self.instead)))

    def render(self) -> str:
        """Short prompt text: '<situation>, <instead>. Avoid: <mistake>.'"""
        return f"{_strip_end(self.situation)}, {_strip_end(self.instead)}. Avoid: {_strip_end(self.mistake)}."

    def payload(self) -> dict[str, Any]:
        """Kind-specific fields stored as JSON."""
        return {
            "situation": self.situation,
            "mistake": self.mistake,
            "instead": self.instead,
            "applies_when": self.applies_when,
            "source_ids": list(self.source_ids),
            "example": self.example,
        }

    def to_dict(self) -> dict[str, Any]:
        """All fields as JSON-ready values (the export format)."""
        d = dataclasses.asdict(self)
        d["tags"] = list(self.tags)
        return d


Record = Demonstration | Lesson

_COMMON = ("id", "tags", "source_run", "source_step", "retrieved", "helped", "merged", "created_at", "updated_at",
           "lift")


def record_from_dict(data: dict[str, Any], where: str = "record") -> Record:
    """Build a record from its ``to_dict`` form (as exported to JSONL). Raises UserError naming the problem."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(data).__name__}")
    kind = data.get("kind")
    if kind == "demonstration":
        cls: type = Demonstration
        required = ("question", "trajectory")
        extra = ("reward",)
    elif kind == "lesson":
        cls = Lesson
        required = ("situation", "mistake", "instead")
        extra = ("applies_when", "source_ids", "example")
    else:
        raise UserError(f"{where}: field 'kind' = {kind!r}; expected 'demonstration' or 'lesson'")
    kwargs: dict[str, Any] = {}
    for name in required:
        value = data.get(name)
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"{where}: field '{name}' must be a non-empty string")
        kwargs[name] = value
    for name in extra + _COMMON:
        if name in data and data[name] is not None:
            kwargs[name] = data[name]
    try:
        rec = cls(**kwargs)
    except TypeError as exc:
        raise UserError(f"{where}: {exc}") from None
    _check_types(rec, where)
    return rec


def _check_types(rec: Record, where: str) -> None:
    for name in ("retrieved", "helped", "merged"):
        v = getattr(rec, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise UserError(f"{where}: field '{name}' = {v!r}; expected an integer >= 0")
    if not isinstance(rec.lift, (int, float)) or isinstance(rec.lift, bool) or rec.lift != rec.lift \
            or abs(rec.lift) == float("inf"):
        raise UserError(f"{where}: field 'lift' = {rec.lift!r}; expected a finite number")
    rec.lift = float(rec.lift)
    for name in ("created_at", "updated_at"):
        v = getattr(rec, name)
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise UserError(f"{where}: field '{name}' = {v!r}; expected a unix timestamp")
    if rec.source_step is not None and (not isinstance(rec.source_step, int) or isinstance(rec.source_step, bool)):
        raise UserError(f"{where}: field 'source_step' = {rec.source_step!r}; expected an integer or null")
    if rec.source_run is not None and not isinstance(rec.source_run, str):
        raise UserError(f"{where}: field 'source_run' must be a string or null")
    if not all(isinstance(t, str) for t in rec.tags):
        raise UserError(f"{where}: field 'tags' must be a list of strings")
    if not isinstance(rec.id, str) or not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", rec.id):
        raise UserError(f"{where}: field 'id' = {rec.id!r}; use 1-64 letters, digits or _.:-")
    if isinstance(rec, Lesson) and not isinstance(rec.example, str):
        raise UserError(f"{where}: field 'example' must be a string")
    if isinstance(rec, Lesson) and not all(isinstance(s, str) for s in rec.source_ids):
        raise UserError(f"{where}: field 'source_ids' must be a list of strings")
