"""The memory facade: ``MemoryBank(path)`` with ``context_for``/``retrieve`` before sampling and
``record``/``credit`` after scoring.

```python
bank = MemoryBank("memory/math.sqlite")
system_prompt += bank.context_for(task)             # demonstrations + lessons, within a token budget
... run the agent ...
bank.record(task=task, trajectory=messages, reward=reward, critique=critique_text)
```

Successful episodes are stored whole as :class:`Demonstration` (exact duplicates are counted, not stored
twice); failed ones become a :class:`Lesson` through the abstraction (rule-based or the critic), and a lesson
close to an existing one (embedding cosine, or token-set Jaccard with numbers masked, >= ``dedup_threshold``)
merges into it. The dedup check and the insert/merge run in one ``BEGIN IMMEDIATE`` transaction, so two
processes never add the same lesson twice.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from critique_rl.config import MemoryConfig
from critique_rl.critics.base import Critic
from critique_rl.errors import UserError
from critique_rl.memory.abstraction import CriticAbstractor, Failure, LessonDraft, rule_abstraction
from critique_rl.memory.records import MAX_SOURCE_IDS, Demonstration, Lesson, Record, record_from_dict
from critique_rl.memory.retrieval import RERANK_POOL, Embedder, Hit, SearchIndex, make_embedder, rerank_score
from critique_rl.memory.store import USEFULNESS_EXPR, USEFULNESS_SQL, MemoryStore, row_to_record
from critique_rl.templates import render

DEFAULT_BANK = "memory/critique-rl.sqlite"


def count_tokens(text: str) -> int:
    """Whitespace tokens (what ``token_budget`` counts)."""
    return len(text.split())


def trajectory_text(trajectory: str | Sequence[Mapping[str, Any]]) -> str:
    """A trajectory as text: a string as is; chat messages as 'role: content' lines."""
    if isinstance(trajectory, str):
        return trajectory
    lines = []
    for msg in trajectory:
        content = msg.get("content", "")
        if not isinstance(content, str):
            content = json.dumps(content, ensure_ascii=False)
        lines.append(f"{msg.get('role', 'user')}: {content}")
    return "\n".join(lines)


def final_response(trajectory: str | Sequence[Mapping[str, Any]]) -> str:
    """The policy's last answer: the last assistant message of a chat, or the whole string."""
    if isinstance(trajectory, str):
        return trajectory
    for msg in reversed(list(trajectory)):
        if msg.get("role") == "assistant" and isinstance(msg.get("content"), str):
            return msg["content"]
    return trajectory_text(trajectory)


@dataclass
class Episode:
    """One finished episode to remember (the arguments of :meth:`MemoryBank.record`)."""

    task: str
    """The question / task statement the policy saw."""
    trajectory: str | Sequence[Mapping[str, Any]]
    reward: float
    critique: str | None = None
    success: bool | None = None
    """None: success means reward > 0."""
    reference: str | None = None
    tags: Sequence[str] = ()
    source_run: str | None = None
    step: int | None = None
    task_name: str | None = None
    """Task name (e.g. 'addition'): picks the rule abstraction and is added to the tags. None: the first tag
    with a registered abstraction, if any."""
    episode_id: str | None = None
    """Id linking a lesson to its source episode. None: a fresh one."""


@dataclass
class RecordResult:
    """What :meth:`MemoryBank.record` did."""

    action: Literal["new", "merged", "dropped"]
    kind: Literal["demonstration", "lesson"]
    id: str | None
    """The stored (new or merged-into) record's id; None when dropped."""
    episode_id: str
    reason: str = ""
    similarity: float | None = None


@dataclass
class Retrieved:
    """What was retrieved for one question, already packed into the token budget."""

    question: str
    demonstrations: list[Demonstration] = field(default_factory=list)
    lessons: list[Lesson] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    text: str = ""
    """The rendered context (``prompts/memory_context.j2``); empty when nothing was retrieved."""

    @property
    def ids(self) -> list[str]:
        """Ids of every retrieved record (pass them to :meth:`MemoryBank.credit`)."""
        return [r.id for r in self.items]

    @property
    def items(self) -> list[Record]:
        """Demonstrations then lessons."""
        return [*self.demonstrations, *self.lessons]

    def __bool__(self) -> bool:
        return bool(self.demonstrations or self.lessons)


@dataclass
class PruneResult:
    """Records removed (or, with ``dry_run``, that would be), per reason; ids listed once."""

    removed: list[str]
    by_reason: dict[str, int]
    dry_run: bool


class MemoryBank:
    """A SkillRL-style memory bank in one SQLite file (see the module docstring)."""

    def __init__(
        self,
        path: str | Path | None = None,
        config: MemoryConfig | None = None,
        critic: Critic | None = None,
        *,
        embedder: Embedder | None = None,
        template_dir: str | None = None,
        abstraction_retries: int = 2,
        create: bool = True,
        lock_timeout_s: float = 120.0,
    ) -> None:
        """Open (or create) the bank at ``path`` (default: ``config.bank_path``).

        ``embedder``: use this instead of the one ``config.embeddings`` selects. ``create=False``: a missing
        file is a :class:`UserError` (read-only tools). ``abstraction_retries``: critic re-asks for invalid
        lesson JSON before the failure is dropped."""
        self.config = config or MemoryConfig()
        path = path if path is not None else self.config.bank_path
        if path is None:
            raise UserError("config field 'memory.bank_path' = None: give the bank a file path, "
                            f"e.g. {DEFAULT_BANK}")
        if self.config.abstraction == "critic" and critic is None:
            raise UserError("config field 'memory.abstraction' = 'critic' needs a critic; pass critic=... or "
                            "set memory.abstraction: rule")
        self.critic = critic
        self.template_dir = template_dir
        self.store = MemoryStore(path, create=create, lock_timeout_s=lock_timeout_s)
        self.embedder = embedder if embedder is not None else make_embedder(self.config.embeddings)
        self.index = SearchIndex(self.store, self.embedder)
        self.abstractor = (CriticAbstractor(critic, abstraction_retries, template_dir)
                           if self.config.abstraction == "critic" and critic is not None else None)

    # ---- properties -----------------------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        """The bank file."""
        return self.store.path

    @property
    def backend(self) -> str:
        """'lexical' or 'embeddings:<model>'."""
        return f"embeddings:{self.embedder.name}" if self.embedder is not None else "lexical"

    def __enter__(self) -> MemoryBank:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the database connection."""
        self.store.close()

    def __len__(self) -> int:
        return self.store.count_state(None)[0]

    # ---- writing ------------------------------------------------------------------------------------------
    def record(
        self,
        task: str,
        trajectory: str | Sequence[Mapping[str, Any]],
        reward: float,
        critique: str | None = None,
        success: bool | None = None,
        reference: str | None = None,
        tags: Sequence[str] = (),
        source_run: str | None = None,
        step: int | None = None,
        task_name: str | None = None,
        episode_id: str | None = None,
    ) -> RecordResult:
        """Remember one episode: success -> Demonstration, failure -> Lesson (new, merged or dropped).

        ``success`` None means ``reward > 0``. ``trajectory``: the response text, or chat messages."""
        return self.record_many([Episode(task, trajectory, reward, critique, success, reference, tags,
                                         source_run, step, task_name, episode_id)])[0]

    def record_many(self, episodes: Sequence[Episode]) -> list[RecordResult]:
        """:meth:`record` for a batch: one critic call and one embedding call for all, one transaction each."""
        from critique_rl.memory.abstraction import ABSTRACTIONS

        pending: list[tuple[Episode, str, Record | None, str]] = []  # (episode, episode id, record, reason)
        failures: list[tuple[int, Failure]] = []
        for ep in episodes:
            eid = ep.episode_id or "E-" + uuid.uuid4().hex[:12]
            task_name = ep.task_name or next((t for t in ep.tags if t in ABSTRACTIONS), None)
            tags = tuple(dict.fromkeys([*ep.tags, *([task_name] if task_name else [])]))
            success = ep.success if ep.success is not None else ep.reward > 0
            if success:
                rec: Record = Demonstration(question=ep.task, trajectory=trajectory_text(ep.trajectory),
                                            reward=float(ep.reward), tags=tags, source_run=ep.source_run,
                                            source_step=ep.step)
                pending.append((ep, eid, rec, ""))
            else:
                failures.append((len(pending), Failure(question=ep.task, response=final_response(ep.trajectory),
                                                       verdict=False, critique=ep.critique,
                                                       reference=ep.reference, task=task_name)))
                pending.append((ep, eid, None, ""))
        drafts = self._abstract([f for _, f in failures])
        for (pos, _f), draft in zip(failures, drafts, strict=True):
            ep, eid, _, _ = pending[pos]
            if draft is None:
                pending[pos] = (ep, eid, None, "abstraction gave no valid lesson")
                continue
            tags = tuple(dict.fromkeys([*ep.tags, *(_f.task and [_f.task] or []), *draft.tags]))
            pending[pos] = (ep, eid, Lesson(situation=draft.situation, mistake=draft.mistake,
                                            instead=draft.instead, applies_when=draft.applies_when, tags=tags,
                                            source_ids=[eid], source_run=ep.source_run, source_step=ep.step,
                                            example=ep.task),
                            "")
        vecs: dict[int, np.ndarray] = {}
        if self.embedder is not None:
            todo = [i for i, p in enumerate(pending) if p[2] is not None]
            if todo:
                enc = self.embedder.encode([pending[i][2].key_text for i in todo])  # type: ignore[union-attr]
                vecs = {i: enc[j] for j, i in enumerate(todo)}
        results: list[RecordResult] = []
        for i, (_ep, eid, rec, reason) in enumerate(pending):
            if rec is None:
                self.store.write(lambda c: MemoryStore.add_counter(c, "abstraction_dropped"))
                results.append(RecordResult("dropped", "lesson", None, eid, reason))
                continue
            results.append(self.store.write(lambda c, rec=rec, eid=eid, vec=vecs.get(i):
                                            self._insert_or_merge(c, rec, eid, vec)))
        self.index.persist_backfill()
        return results

    def _abstract(self, failures: list[Failure]) -> list[LessonDraft | None]:
        if not failures:
            return []
        if self.abstractor is not None:
            before_invalid = self.abstractor.stats.invalid
            drafts = self.abstractor.abstract(failures)
            invalid = self.abstractor.stats.invalid - before_invalid
            if invalid:
                self.store.write(lambda c: MemoryStore.add_counter(c, "abstraction_invalid", invalid))
            return drafts
        return [rule_abstraction(f) for f in failures]

    def _insert_or_merge(self, conn: Any, rec: Record, eid: str, vec: np.ndarray | None) -> RecordResult:
        now = time.time()
        row = conn.execute("SELECT id FROM records WHERE kind = ? AND dedup_hash = ? LIMIT 1",
                           (rec.kind, rec.dedup_hash)).fetchone()
        target, sim = (row[0], 1.0) if row else (None, None)
        if target is None and isinstance(rec, Lesson):
            self.index.refresh(conn)
            found = self.index.near_duplicate(rec.key_text, self.config.dedup_threshold, vec)
            if found:
                target, sim = found
        if target is None:
            embed_model = self.embedder.name if self.embedder is not None else None
            MemoryStore.insert(conn, rec, vec, embed_model)
            return RecordResult("new", rec.kind, rec.id, eid)
        existing = MemoryStore.get_in(conn, target)
        assert existing is not None
        tags = list(dict.fromkeys([*existing.tags, *rec.tags]))
        if isinstance(existing, Lesson):
            payload = existing.payload()
            payload["source_ids"] = (payload["source_ids"] + [eid])[-MAX_SOURCE_IDS:]
        else:
            payload = existing.payload()
        conn.execute("UPDATE records SET merged = merged + 1, updated_at = ?, payload = ?, tags = ? WHERE id = ?",
                     (now, json.dumps(payload), json.dumps(tags), target))
        return RecordResult("merged", rec.kind, target, eid, similarity=sim)

    def credit(self, ids: Iterable[str] | Retrieved, success: bool, baseline: float | None = None) -> int:
        """Credit the records that were in one episode's prompt with its outcome; returns records credited.

        Without ``baseline`` (the old form, for callers that retrieved with ``count=True``): ``helped`` += 1 on
        success, nothing on failure. With ``baseline`` (the success rate expected without these records, e.g.
        the mean over episodes that had no memory, or the batch's mean): ``retrieved`` += 1, ``helped`` +=
        success, ``lift`` += success - baseline, so :attr:`Record.usefulness` ranks retrieval and pruning.
        Retrieve with ``count=False`` then, or ``retrieved`` is counted twice."""
        if isinstance(ids, Retrieved):
            ids = ids.ids
        ids = list(dict.fromkeys(ids))
        if baseline is None:
            return self.store.bump(ids, "helped") if success else 0
        if not 0.0 <= baseline <= 1.0:
            raise UserError(f"credit: baseline = {baseline!r}; give the success rate without memory, in [0, 1]")
        ok = float(bool(success))
        return self.store.add_credit({i: (1, int(ok), ok - baseline) for i in ids})

    # ---- reading ------------------------------------------------------------------------------------------
    def _sync(self) -> None:
        self.index.refresh()
        self.index.persist_backfill()

    def _fill(self, kind: str, k: int, have: list[Hit], tags: Sequence[str] | None) -> list[Hit]:
        """Lexical mode: top up with the most useful records when too few match any query word."""
        if len(have) >= k:
            return have
        chosen = {h.id for h in have}
        sql = "SELECT id FROM records WHERE kind = ?"
        args: list[Any] = [kind]
        if tags:
            sql += f" AND EXISTS (SELECT 1 FROM json_each(records.tags) WHERE value IN ({','.join('?' * len(tags))}))"
            args.extend(tags)
        sql += f" ORDER BY {USEFULNESS_SQL} LIMIT ?"
        args.append(k + len(chosen))
        ids = self.store.read(lambda c: [r[0] for r in c.execute(sql, args)])
        extra = [Hit(i, kind, 0.0) for i in ids if i not in chosen]
        return have + extra[: k - len(have)]

    def search(self, query: str, k: int = 10, kind: str | None = None,
               tags: Sequence[str] | None = None) -> list[tuple[Record, float]]:
        """Best ``k`` records per kind for ``query`` with scores; no counting, no budget (for tools)."""
        self._sync()
        vec = self.embedder.encode([query])[0] if self.embedder is not None and len(self.index.ids) else None
        hits: list[Hit] = []
        for kd in ([kind] if kind else ["demonstration", "lesson"]):
            hits += self.index.search(query, kd, k, tags, vec)
        recs = self.store.get_many([h.id for h in hits])
        return [(recs[h.id], h.score) for h in hits if h.id in recs]

    def retrieve(self, question: str, k_demos: int | None = None, k_lessons: int | None = None,
                 token_budget: int | None = None, tags: Sequence[str] | None = None,
                 count: bool = True) -> Retrieved:
        """Top-k demonstrations and lessons for ``question``, packed into ``token_budget`` whitespace tokens
        of rendered context. Increments ``retrieved`` of what made it in (``count=False``: don't).

        Packing takes lessons and demonstrations alternately in rank order (lesson first: short and general)
        and skips any item that would push the rendered context over the budget. ``tags``: only records with
        at least one of these tags. Lexical mode tops up with the most useful records when fewer than k
        match a query word."""
        return self.retrieve_many([question], k_demos, k_lessons, token_budget, tags, count)[0]

    def retrieve_many(self, questions: Sequence[str], k_demos: int | None = None, k_lessons: int | None = None,
                      token_budget: int | None = None, tags: Sequence[str] | None = None,
                      count: bool = True) -> list[Retrieved]:
        """:meth:`retrieve` for a batch of questions (one embedding call, one counting transaction)."""
        k_d = self.config.top_k_demos if k_demos is None else k_demos
        k_l = self.config.top_k_lessons if k_lessons is None else k_lessons
        budget = self.config.token_budget if token_budget is None else token_budget
        self._sync()
        vecs = None
        if self.embedder is not None and self.index.n and questions:
            vecs = self.embedder.encode(list(questions))
        out: list[Retrieved] = []
        weight = self.config.usefulness_weight
        for qi, q in enumerate(questions):
            vec = vecs[qi] if vecs is not None else None
            d_hits = self._ranked(q, "demonstration", k_d, tags, vec, weight)
            l_hits = self._ranked(q, "lesson", k_l, tags, vec, weight)
            if self.embedder is None:
                d_hits = self._fill("demonstration", k_d, d_hits, tags)
                l_hits = self._fill("lesson", k_l, l_hits, tags)
            out.append(self._pack(q, d_hits, l_hits, budget))
        if count:
            ids = [i for r in out for i in r.ids]
            if ids:
                self.store.bump(ids, "retrieved")
        return out

    def _ranked(self, query: str, kind: str, k: int, tags: Sequence[str] | None, vec: np.ndarray | None,
                weight: float) -> list[Hit]:
        """Top ``k`` by similarity, or (``weight`` > 0) the ``RERANK_POOL * k`` most similar re-ranked by
        :func:`rerank_score` (similarity relative to the best candidate plus ``weight`` x usefulness). Hits keep
        their similarity as ``score`` (what ``min_score`` and the CLI read)."""
        if weight <= 0 or k <= 0:
            return self.index.search(query, kind, k, tags, vec)
        pool = self.index.search(query, kind, RERANK_POOL * k, tags, vec)
        if len(pool) <= 1:
            return pool
        use = self.store.usefulness_of([h.id for h in pool])
        top = max(h.score for h in pool)
        ranked = sorted(pool, key=lambda h: -rerank_score(h.score, top, use.get(h.id, 0.0), weight))
        return ranked[:k]

    def _pack(self, question: str, d_hits: list[Hit], l_hits: list[Hit], budget: int) -> Retrieved:
        recs = self.store.get_many([h.id for h in d_hits + l_hits])
        order: list[Hit] = []
        for i in range(max(len(d_hits), len(l_hits))):
            order += [h for h in (l_hits[i] if i < len(l_hits) else None,
                                  d_hits[i] if i < len(d_hits) else None) if h is not None]
        res = Retrieved(question)
        for h in order:
            rec = recs.get(h.id)
            if rec is None:  # pruned between search and fetch
                continue
            demos = res.demonstrations + ([rec] if isinstance(rec, Demonstration) else [])
            lessons = res.lessons + ([rec] if isinstance(rec, Lesson) else [])
            text = self.render_context(demos, lessons)
            if count_tokens(text) > budget:
                continue
            res.demonstrations, res.lessons, res.text = demos, lessons, text
            res.scores[rec.id] = h.score
        return res

    def render_context(self, demos: Sequence[Demonstration], lessons: Sequence[Lesson]) -> str:
        """Render records with ``prompts/memory_context.j2`` (text passed as variables only)."""
        if not demos and not lessons:
            return ""
        return render("memory_context.j2", self.template_dir, demos=[d.render() for d in demos],
                      lessons=[x.render() for x in lessons])

    def above(self, r: Retrieved, min_score: float) -> Retrieved:
        """``r`` without the records scoring at or below ``min_score`` (the context re-rendered)."""
        keep = {x.id for x in r.items if r.scores.get(x.id, 0.0) > min_score}
        if len(keep) == len(r.items):
            return r
        demos, lessons = [x for x in r.demonstrations if x.id in keep], [x for x in r.lessons if x.id in keep]
        return Retrieved(r.question, demos, lessons, {i: r.scores[i] for i in keep}, self.render_context(demos, lessons))

    def context_for(self, question: str, k_demos: int | None = None, k_lessons: int | None = None,
                    token_budget: int | None = None, tags: Sequence[str] | None = None) -> str:
        """Rendered demonstrations + lessons for ``question`` within the budget; '' when nothing retrieved."""
        return self.retrieve(question, k_demos, k_lessons, token_budget, tags).text

    def get(self, rid: str) -> Record | None:
        """The record with id ``rid``, or None."""
        return self.store.get(rid)

    def list(self, kind: str | None = None, limit: int | None = None, order: str = "recent",
             tag: str | None = None) -> list[Record]:
        """Records, newest (``recent``) or most useful (``useful``) first."""
        return self.store.list(kind, limit, order, tag)

    def stats(self) -> dict[str, Any]:
        """Counts per kind, retrieval/help/merge sums, abstraction counters, backend and schema version."""
        per_kind = self.store.stats()
        counters = self.store.counters()
        empty = {"count": 0, "retrieved": 0, "helped": 0, "merged": 0, "embedded": 0, "lift": 0.0}
        out: dict[str, Any] = {
            "path": str(self.path),
            "schema_version": self.store.schema_version,
            "backend": self.backend,
            "demonstrations": per_kind.get("demonstration", dict(empty)),
            "lessons": per_kind.get("lesson", dict(empty)),
            "abstraction_dropped": counters.get("abstraction_dropped", 0),
            "abstraction_invalid": counters.get("abstraction_invalid", 0),
            "size_bytes": self.path.stat().st_size if self.path.exists() else 0,
        }
        out["total"] = out["demonstrations"]["count"] + out["lessons"]["count"]
        return out

    # ---- maintenance --------------------------------------------------------------------------------------
    def prune(self, max_age_days: float | None = None, min_helped_ratio: float | None = None,
              keep: int | None = None, min_retrieved: int = 5, dry_run: bool = False,
              min_usefulness: float | None = None, useless_after_days: float | None = None) -> PruneResult:
        """Remove stale or unhelpful records, in one transaction.

        - ``max_age_days``: not updated (recorded, merged, retrieved or credited) for this many days.
        - ``min_helped_ratio``: helped/retrieved below this, once retrieved at least ``min_retrieved`` times.
        - ``min_usefulness``: mean lift (``lift / retrieved``: how much more often the episodes that saw it
          succeeded than their baseline) below this, once retrieved at least ``min_retrieved`` times; e.g. 0
          removes records that did worse than no memory.
        - ``useless_after_days``: usefulness and age together: created this many days ago or more and its
          smoothed usefulness (``lift / (retrieved + 2)``) is <= 0, i.e. it never earned its place (never
          retrieved, or no better than the baseline).
        - ``keep``: keep only the ``keep`` most useful records of each kind (smoothed mean lift, then the
          smoothed helped ratio, merged count, recency)."""
        if max_age_days is None and min_helped_ratio is None and keep is None and min_usefulness is None \
                and useless_after_days is None:
            raise UserError("prune needs at least one of max_age_days, min_helped_ratio, min_usefulness, "
                            "useless_after_days, keep")
        if useless_after_days is not None and useless_after_days < 0:
            raise UserError(f"prune: useless_after_days = {useless_after_days!r}; must be >= 0")
        if min_usefulness is not None and not -1.0 <= min_usefulness <= 1.0:
            raise UserError(f"prune: min_usefulness = {min_usefulness!r}; use a value in [-1, 1]")
        for name, v in (("max_age_days", max_age_days), ("keep", keep)):
            if v is not None and v < 0:
                raise UserError(f"prune: {name} = {v!r}; must be >= 0")
        if min_helped_ratio is not None and not 0.0 <= min_helped_ratio <= 1.0:
            raise UserError(f"prune: min_helped_ratio = {min_helped_ratio!r}; use a value in [0, 1]")
        now = time.time()

        def w(c: Any) -> PruneResult:
            reasons: dict[str, list[str]] = {}
            if max_age_days is not None:
                reasons["age"] = [r[0] for r in c.execute("SELECT id FROM records WHERE updated_at < ?",
                                                          (now - max_age_days * 86400.0,))]
            if min_helped_ratio is not None:
                reasons["helped_ratio"] = [r[0] for r in c.execute(
                    "SELECT id FROM records WHERE retrieved >= ? AND (helped * 1.0 / retrieved) < ?",
                    (max(1, min_retrieved), min_helped_ratio))]
            if min_usefulness is not None:
                reasons["usefulness"] = [r[0] for r in c.execute(
                    "SELECT id FROM records WHERE retrieved >= ? AND (lift / retrieved) < ?",
                    (max(1, min_retrieved), min_usefulness))]
            if useless_after_days is not None:
                reasons["useless_and_old"] = [r[0] for r in c.execute(
                    f"SELECT id FROM records WHERE created_at <= ? AND {USEFULNESS_EXPR} <= 0",
                    (now - useless_after_days * 86400.0,))]
            if keep is not None:
                reasons["keep"] = [r[0] for kind in ("demonstration", "lesson") for r in c.execute(
                    f"SELECT id FROM records WHERE kind = ? ORDER BY {USEFULNESS_SQL} LIMIT -1 OFFSET ?",
                    (kind, keep))]
            removed = list(dict.fromkeys(i for ids in reasons.values() for i in ids))
            if not dry_run:
                for i in range(0, len(removed), 500):
                    chunk = removed[i:i + 500]
                    c.execute(f"DELETE FROM records WHERE id IN ({','.join('?' * len(chunk))})", chunk)
            return PruneResult(removed, {k: len(v) for k, v in reasons.items()}, dry_run)
        return self.store.write(w)

    def export_jsonl(self, path: str | Path) -> int:
        """Write every record (without embeddings) as one JSON object per line; returns the count."""
        dest = Path(path).expanduser()
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
        n = 0
        with tmp.open("w", encoding="utf-8") as fh:
            for rec in self.store.iter_all():
                fh.write(json.dumps(rec.to_dict(), ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, dest)
        return n

    def import_jsonl(self, path: str | Path) -> dict[str, int]:
        """Add records from a JSONL export (ids and counts kept). Every line is validated before anything is
        written; ids already in the bank are skipped. Returns {'imported': n, 'skipped': m}."""
        src = Path(path).expanduser()
        if not src.is_file():
            raise UserError(f"import file '{path}' does not exist")
        recs: list[Record] = []
        with src.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                recs.append(record_from_dict(data, where=f"{path}:{lineno}"))
        imported = skipped = 0
        for i in range(0, len(recs), 500):
            chunk = recs[i:i + 500]

            def w(c: Any, chunk: list[Record] = chunk) -> tuple[int, int]:
                new = old = 0
                for rec in chunk:
                    if c.execute("SELECT 1 FROM records WHERE id = ?", (rec.id,)).fetchone():
                        old += 1
                    else:
                        MemoryStore.insert(c, rec)
                        new += 1
                return new, old
            a, b = self.store.write(w)
            imported += a
            skipped += b
        return {"imported": imported, "skipped": skipped}

    def snapshot(self, path: str | Path) -> Path:
        """Consistent copy of the bank (SQLite backup API), e.g. next to a training checkpoint."""
        return self.store.backup(path)


__all__ = ["MemoryBank", "Episode", "RecordResult", "Retrieved", "PruneResult", "row_to_record", "DEFAULT_BANK",
           "count_tokens", "rerank_score"]
