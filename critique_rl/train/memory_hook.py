"""The trainer's side of the memory (DESIGN.md "One training step", steps 1 and 9).

:class:`MemoryHook` sits between :class:`~critique_rl.train.trainer.CritiqueGRPOTrainer` and a
:class:`~critique_rl.memory.MemoryBank`:

- ``contexts(rows)`` before sampling: one rendered context per question (demonstrations + lessons within
  the token budget; ``""`` when nothing was retrieved), and it remembers which records went into each prompt.
- ``update(...)`` after scoring: successes become demonstrations (at most one per group: the first correct
  response), failures become lessons (at most one per group, at most ``max_lessons_per_step`` per step, groups
  with no correct response first); dedup/merge in the bank does the rest. Every retrieved record is credited
  per episode: ``retrieved`` += episodes whose prompt held it, ``helped`` += those that succeeded (``helped /
  retrieved``: the success rate of the episodes that saw it, what ``memory prune --min-helped-ratio`` reads),
  and ``lift`` += their successes minus the step's mean success rate over all its episodes (the group's
  advantage over the batch where the record was retrieved). ``lift / (retrieved + 2)`` is the record's
  usefulness: retrieval ranks by it (``memory.usefulness_weight``), ``memory prune --min-usefulness`` /
  ``--useless-after-days`` and ``memory useful`` read it.
- ``snapshot(ckpt_dir)`` / ``restore(...)``: the bank travels with checkpoints, so a resumed run sees the bank
  as it was at the checkpoint step, not the one a crashed run kept writing to.

Helpers for runs whose policy must learn to read memory first (a tiny model trained from scratch never saw a
context): :func:`sft_context_fn` renders contexts for a fraction of SFT prompts from the task's own lessons,
and :func:`memory_eval_prompts` builds evaluation prompts with retrieval from the bank (read-only, nothing
counted).
"""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from critique_rl.config import MemoryConfig
from critique_rl.critics.base import Critic
from critique_rl.memory import Episode, MemoryBank, Retrieved
from critique_rl.memory.abstraction import CriticAbstractor
from critique_rl.memory.bank import count_tokens

SNAPSHOT_NAME = "memory.sqlite"
"""File name of the bank copy inside a checkpoint directory."""
INITIAL_SNAPSHOT = "memory_initial.sqlite"
"""Run-directory copy of the bank as it was when the run first started (see :meth:`MemoryHook.begin_fresh_run`)."""
INITIAL_ABSENT = "memory_initial.absent"
"""Run-directory marker: the bank did not exist when the run first started."""


class MemoryHook:
    """Retrieval before sampling, recording and credit after scoring, snapshots with checkpoints.

    Args:
        bank: the open bank.
        cfg: the ``memory:`` config (``enabled`` False makes every call a no-op that returns empty contexts
            and no metrics).
        task_name: tags what is recorded and (``filter_by_task``) restricts retrieval to this task's records.
        run_name: stored as ``source_run`` of every record.
        critic: used for lesson abstraction when ``cfg.abstraction == 'critic'`` and the bank has none.
        max_lessons_per_step: failures turned into lessons per step at most (bounds critic calls and bank
            growth).
        max_demos_per_step: successes recorded per step at most (one per group anyway).
        filter_by_task: retrieve only records tagged ``task_name`` (a shared bank then serves each task its
            own memory).
        min_score: drop retrieved records whose retrieval score is <= this (e.g. 0.0 drops the lexical
            top-up of records that match no query word). None keeps everything the bank packed.
    """

    def __init__(self, bank: MemoryBank, cfg: MemoryConfig, task_name: str, run_name: str,
                 critic: Critic | None = None, *, max_lessons_per_step: int = 8,
                 max_demos_per_step: int | None = None, filter_by_task: bool = True,
                 min_score: float | None = None) -> None:
        self.bank = bank
        self.cfg = cfg
        self.task_name = task_name
        self.run_name = run_name
        self.max_lessons_per_step = max_lessons_per_step
        self.max_demos_per_step = max_demos_per_step
        self.filter_by_task = filter_by_task
        self.min_score = min_score
        if critic is not None and bank.abstractor is None and cfg.abstraction == "critic":
            bank.critic = critic
            bank.abstractor = CriticAbstractor(critic, template_dir=bank.template_dir)
        self._last: list[Retrieved] = []

    # ---- before sampling ------------------------------------------------------------------------------------
    def retrieve(self, rows: Sequence[dict[str, Any]]) -> list[Retrieved]:
        """What the bank gives each row's question (no counting; :meth:`update` does the credit)."""
        if not self.cfg.enabled or not rows:
            return [Retrieved(r["prompt"]) for r in rows]
        tags = [self.task_name] if self.filter_by_task else None
        got = self.bank.retrieve_many([r["prompt"] for r in rows], tags=tags, count=False)
        if self.min_score is not None:
            got = [self.bank.above(r, self.min_score) for r in got]
        return got

    def contexts(self, rows: list[dict]) -> list[str]:
        """One rendered context per row (``""`` = none); the retrieved ids are kept for :meth:`update`."""
        self._last = self.retrieve(rows)
        return [r.text for r in self._last]

    # ---- after scoring --------------------------------------------------------------------------------------
    def _retrieved_for(self, rows: list[dict], group_size: int) -> list[list[str]]:
        """Retrieved ids per group, matched to the last :meth:`contexts` call (by position, else by prompt)."""
        n_groups = len(rows) // group_size
        prompts = [rows[g * group_size]["prompt"] for g in range(n_groups)]
        if len(self._last) == n_groups and all(r.question == p for r, p in zip(self._last, prompts, strict=True)):
            return [r.ids for r in self._last]
        by_prompt = {r.question: r.ids for r in self._last}
        return [by_prompt.get(p, []) for p in prompts]

    def update(self, rows: list[dict], completions: list[str], correct: list[bool],
               critiques: list[str | None], step: int, group_size: int) -> dict[str, float]:
        """Record, credit and report after one step's scoring.

        ``rows``/``completions``/``correct``/``critiques`` are flat (B * group_size), grouped contiguously.
        Returns ``memory/*`` metrics (``memory/hit_success_rate`` is None when no prompt had a context)."""
        if not self.cfg.enabled:
            return {}
        n = len(rows)
        if not (len(completions) == len(correct) == n) or (critiques and len(critiques) != n) or n % group_size:
            raise ValueError(f"MemoryHook.update: rows/completions/correct/critiques must all have length "
                             f"B*group_size; got {n}, {len(completions)}, {len(correct)}, {len(critiques)} "
                             f"with group_size {group_size}")
        critiques = list(critiques) if critiques else [None] * n
        n_groups = n // group_size
        retrieved = self._retrieved_for(rows, group_size)

        # credit: per episode that saw the record; lift against the step's mean success (the group's advantage)
        baseline = sum(bool(c) for c in correct) / n
        counts: dict[str, list[float]] = {}
        hit_eps = hit_ok = miss_eps = miss_ok = 0
        for g in range(n_groups):
            ok = sum(bool(c) for c in correct[g * group_size:(g + 1) * group_size])
            if retrieved[g]:
                hit_eps += group_size
                hit_ok += ok
            else:
                miss_eps += group_size
                miss_ok += ok
            for rid in dict.fromkeys(retrieved[g]):
                c = counts.setdefault(rid, [0, 0, 0.0])
                c[0] += group_size
                c[1] += ok
                c[2] += ok - group_size * baseline
        if counts:
            self.bank.store.add_credit({rid: (int(r), int(h), lf) for rid, (r, h, lf) in counts.items()})

        # recording: one demonstration per group with a success, one lesson per failing group (bounded)
        episodes: list[Episode] = []
        demos = 0
        for g in range(n_groups):
            if self.max_demos_per_step is not None and demos >= self.max_demos_per_step:
                break
            i = next((g * group_size + j for j in range(group_size) if correct[g * group_size + j]), None)
            if i is not None:
                episodes.append(self._episode(rows[i], completions[i], True, None, step))
                demos += 1
        failing = [g for g in range(n_groups) if not all(correct[g * group_size:(g + 1) * group_size])]
        failing.sort(key=lambda g: any(correct[g * group_size:(g + 1) * group_size]))  # all-wrong groups first
        for g in failing[: self.max_lessons_per_step]:
            i = next(g * group_size + j for j in range(group_size) if not correct[g * group_size + j])
            episodes.append(self._episode(rows[i], completions[i], False, critiques[i], step))
        results = self.bank.record_many(episodes) if episodes else []

        tally = {(a, k): 0 for a in ("new", "merged", "dropped") for k in ("demonstration", "lesson")}
        for r in results:
            tally[(r.action, r.kind)] += 1
        n_lessons, n_demos = self._counts()
        with_ctx = sum(1 for ids in retrieved if ids)
        quality = retrieval_quality([rows[g * group_size] for g in range(n_groups)], self._retrieved_records(rows, group_size))
        return {
            **quality,
            "memory/size": float(n_lessons + n_demos),
            "memory/lessons": float(n_lessons),
            "memory/demonstrations": float(n_demos),
            "memory/retrieved": sum(len(ids) for ids in retrieved) / max(1, n_groups),
            "memory/context_rate": with_ctx / max(1, n_groups),
            "memory/new_lessons": float(tally[("new", "lesson")]),
            "memory/new_demos": float(tally[("new", "demonstration")]),
            "memory/merged": float(tally[("merged", "lesson")] + tally[("merged", "demonstration")]),
            "memory/dropped": float(tally[("dropped", "lesson")]),
            "memory/hit_success_rate": hit_ok / hit_eps if hit_eps else None,  # type: ignore[dict-item]
            "memory/miss_success_rate": miss_ok / miss_eps if miss_eps else None,  # type: ignore[dict-item]
            "memory/credit_baseline": baseline,
            "memory/credited_records": float(len(counts)),
        }

    def _episode(self, row: dict, completion: str, success: bool, critique: str | None, step: int) -> Episode:
        answer = row.get("answer")
        key = row.get("memory_key")
        return Episode(task=row["prompt"], trajectory=completion, reward=1.0 if success else 0.0,
                       critique=critique, success=success, reference=None if answer is None else str(answer),
                       tags=(key,) if isinstance(key, str) and key else (),
                       source_run=self.run_name, step=step, task_name=self.task_name)

    def _retrieved_records(self, rows: list[dict], group_size: int) -> list[Retrieved]:
        """The :class:`Retrieved` of each group (matched like :meth:`_retrieved_for`; empty when unmatched)."""
        n_groups = len(rows) // group_size
        prompts = [rows[g * group_size]["prompt"] for g in range(n_groups)]
        by_prompt = {r.question: r for r in self._last}
        return [by_prompt.get(p, Retrieved(p)) for p in prompts]

    def _counts(self) -> tuple[int, int]:
        def q(c: sqlite3.Connection) -> tuple[int, int]:
            got = dict(c.execute("SELECT kind, count(*) FROM records GROUP BY kind").fetchall())
            return int(got.get("lesson", 0)), int(got.get("demonstration", 0))
        return self.bank.store.read(q)

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def snapshot(self, path: Path) -> None:
        """Consistent copy of the bank (SQLite backup API) into checkpoint directory ``path`` as
        ``memory.sqlite`` (``path`` ending in ``.sqlite`` is used as the file name itself)."""
        self.bank.snapshot(_snapshot_file(Path(path)))

    @staticmethod
    def restore(snapshot_path: Path, bank_path: Path) -> None:
        """Replace the bank file with a checkpoint's copy (``snapshot_path``: the checkpoint directory or the
        file). Call it before the bank is opened; its -wal/-shm files are removed so SQLite cannot replay
        writes made after the checkpoint. A checkpoint without a snapshot leaves the bank as it is."""
        src = _snapshot_file(Path(snapshot_path))
        if not src.is_file():
            return
        dest = Path(bank_path).expanduser()
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + f".restore-{os.getpid()}")
        shutil.copyfile(src, tmp)
        for suffix in ("-wal", "-shm", "-journal"):
            side = dest.with_name(dest.name + suffix)
            if side.exists():
                side.unlink()
        os.replace(tmp, dest)

    @staticmethod
    def begin_fresh_run(bank_path: Path, run_dir: Path) -> bool:
        """Call on a fresh (not resumed) start, before the bank is opened. The first start of a run directory
        records the bank as it is (a consistent copy, or a marker that there was none); a later fresh start in
        the same directory (an attempt that died before its first checkpoint, or a restart after the checkpoints
        were removed) puts the bank back to that state, so a dead attempt's records are not counted twice.
        Returns True when the bank was put back."""
        bank_path, run_dir = Path(bank_path).expanduser(), Path(run_dir)
        snap, absent = run_dir / INITIAL_SNAPSHOT, run_dir / INITIAL_ABSENT
        if snap.is_file():
            MemoryHook.restore(snap, bank_path)
            return True
        if absent.is_file():
            existed = bank_path.exists()
            for f in (bank_path, *_sidecars(bank_path)):
                f.unlink(missing_ok=True)
            return existed
        run_dir.mkdir(parents=True, exist_ok=True)
        if bank_path.is_file():
            tmp = snap.with_name(snap.name + f".tmp-{os.getpid()}")
            tmp.unlink(missing_ok=True)
            source, dest = sqlite3.connect(str(bank_path)), sqlite3.connect(str(tmp))
            try:
                source.backup(dest)
            finally:
                dest.close()
                source.close()
            os.replace(tmp, snap)
        else:
            absent.write_text("the memory bank did not exist when this run first started\n")
        return False

    def restore_open(self, snapshot_path: Path) -> bool:
        """Like :meth:`restore` for a bank that is already open (e.g. passed in by the user): copies the
        snapshot into the live connection with SQLite's backup API and resets the retrieval cache. Returns
        False when the checkpoint holds no snapshot."""
        src = _snapshot_file(Path(snapshot_path))
        if not src.is_file():
            return False
        store = self.bank.store
        source = sqlite3.connect(str(src))
        try:
            with store._lock:
                source.backup(store.conn)
        finally:
            source.close()
        self.bank.index._reset()
        self._last = []
        return True


def retrieval_quality(rows: Sequence[dict], retrieved: Sequence[Retrieved]) -> dict[str, float | None]:
    """Retrieval quality for one step, one entry per question:

    - ``memory/hit_rate``: among rows with a ``memory_key`` column (the tag of the record that holds the fact
      or solution the row needs, e.g. ``entity:qix`` on the experience task), the fraction whose retrieved
      records include one with that tag; None when no row has a key;
    - ``memory/context_tokens``: mean whitespace tokens of the rendered memory context per question (what
      ``token_budget`` counts; 0 for a question that got none)."""
    if len(rows) != len(retrieved):
        raise ValueError(f"retrieval_quality: {len(rows)} rows but {len(retrieved)} retrieval results")
    keyed = hits = 0
    for row, r in zip(rows, retrieved, strict=True):
        key = row.get("memory_key")
        if key:
            keyed += 1
            hits += any(key in rec.tags for rec in r.items)
    tokens = [count_tokens(r.text) for r in retrieved]
    return {"memory/hit_rate": hits / keyed if keyed else None,
            "memory/context_tokens": sum(tokens) / len(tokens) if tokens else 0.0}


def _sidecars(bank_path: Path) -> list[Path]:
    """The bank's existing -wal/-shm/-journal files."""
    return [s for s in (bank_path.with_name(bank_path.name + x) for x in ("-wal", "-shm", "-journal")) if s.exists()]


def _snapshot_file(path: Path) -> Path:
    return path if path.suffix in (".sqlite", ".db") else path / SNAPSHOT_NAME


# ---------------------------------------------------------------------------------------------------------
# helpers for policies that must learn to read memory (tiny models), and evaluation with memory
# ---------------------------------------------------------------------------------------------------------

def sft_context_fn(context_for_row: Callable[[dict, random.Random], str], rate: float,
                   seed: int = 0) -> Callable[[dict], str]:
    """SFT prompts with memory: ``fn(row) -> context`` that returns ``context_for_row(row, rng)`` for a
    ``rate`` fraction of rows (decided by a hash of seed and prompt, so the same row always gets the same
    context) and ``""`` otherwise. ``context_for_row`` renders what retrieval would give for that question,
    e.g. with :meth:`MemoryBank.render_context` over the task's lessons, so the policy learns the exact format
    it will see during RL."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"sft_context_fn: rate = {rate!r}; use a value in [0, 1]")

    def fn(row: dict) -> str:
        rng = random.Random(f"{seed}:ctx:{row['prompt']}")
        if rng.random() >= rate:
            return ""
        return context_for_row(row, rng)
    return fn


def memory_eval_prompts(hook: MemoryHook, rows: list[dict], prompt_text: Callable[[dict, str | None], str],
                        batch: int = 256) -> dict[str, str]:
    """Evaluation prompts with retrieval: ``{row prompt: prompt_text(row, context)}`` for every row.

    Uses :meth:`MemoryHook.retrieve` (nothing is counted or credited and the hook's remembered ids are left
    alone). Pass ``lambda r: prompts[r['prompt']]`` as the ``prompt_fn`` of
    :func:`critique_rl.train.evaluate.evaluate`."""
    out: dict[str, str] = {}
    for s in range(0, len(rows), batch):
        chunk = rows[s:s + batch]
        for row, r in zip(chunk, hook.retrieve(chunk), strict=True):
            out[row["prompt"]] = prompt_text(row, r.text or None)
    return out


__all__ = ["MemoryHook", "SNAPSHOT_NAME", "memory_eval_prompts", "retrieval_quality", "sft_context_fn"]
