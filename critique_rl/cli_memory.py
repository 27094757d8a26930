"""``critique-rl memory ...``: inspect and maintain a memory bank.

Commands: list, show ID, search TEXT, stats, export FILE.jsonl, import FILE.jsonl, prune. Each takes
``--bank PATH`` and ``--json`` (machine-readable output on stdout). Read commands never create a bank: a
missing file is a one-line error and exit code 2. Register with ``app.add_typer(memory_app, name="memory")``.
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from critique_rl.config import MemoryConfig
from critique_rl.errors import UserError
from critique_rl.memory.bank import DEFAULT_BANK, MemoryBank
from critique_rl.memory.records import Demonstration, Lesson, Record

memory_app = typer.Typer(help="Inspect and maintain a memory bank (demonstrations and lessons).",
                         no_args_is_help=True, add_completion=False)

F = TypeVar("F", bound=Callable[..., Any])

BankOpt = typer.Option(DEFAULT_BANK, "--bank", help="Memory bank SQLite file.")
JsonOpt = typer.Option(False, "--json", help="Print JSON for scripts instead of tables.")


def _console() -> Console:
    return Console(soft_wrap=False)


def _user_errors(fn: F) -> F:
    """Turn UserError into one line on stderr and exit code 2."""
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
    return wrapper  # type: ignore[return-value]


def _open(bank: str, create: bool = False, embeddings: str = "lexical") -> MemoryBank:
    return MemoryBank(bank, MemoryConfig(embeddings=embeddings), create=create)  # type: ignore[arg-type]


def _when(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


def _summary(rec: Record, width: int = 70) -> str:
    text = " ".join(rec.render().split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, ensure_ascii=False, indent=2) + "\n")


WIDE_TABLE_COLUMNS = 110
"""Terminal width from which record tables show every column; narrower ones (e.g. 80 columns) drop the kind
column (the id's ``D-``/``L-`` prefix says it), fold retrieved and usefulness into one ``ret use`` column (merged
and helped: ``memory show``) and show the date only, so the text column gets the width."""


def _records_table(title: str, recs: list[Record], scores: list[float] | None = None,
                   width: int | None = None) -> Table:
    """A table of ``recs``: every column but the text keeps its width (no wrapping), the text takes the rest."""
    compact = (width if width is not None else _console().width) < WIDE_TABLE_COLUMNS
    table = Table(title=_literal(title))
    table.add_column("id", no_wrap=True)
    if not compact:
        table.add_column("kind", no_wrap=True)
    if scores is not None:
        table.add_column("score", justify="right", no_wrap=True)
    table.add_column("text", ratio=1, min_width=16, overflow="fold")
    if compact:
        table.add_column("ret use", justify="right", no_wrap=True)
        table.add_column("updated", no_wrap=True)
    else:
        for name in ("merged", "retrieved", "helped", "usefulness"):
            table.add_column(name, justify="right", no_wrap=True)
        table.add_column("updated", no_wrap=True)
    for i, rec in enumerate(recs):
        row = [rec.id] if compact else [rec.id, "demo" if rec.kind == "demonstration" else "lesson"]
        if scores is not None:
            row.append(f"{scores[i]:.3f}")
        # rich markup is off for data cells: memory text is shown literally
        row.append(_summary(rec, 100 if compact else 150))  # about three lines of the text column
        if compact:
            row += [f"{rec.retrieved} {rec.usefulness:+.2f}",
                    _dt.datetime.fromtimestamp(rec.updated_at).strftime("%Y-%m-%d")]
        else:
            row += [str(rec.merged), str(rec.retrieved), str(rec.helped), f"{rec.usefulness:+.3f}",
                    _when(rec.updated_at)]
        table.add_row(*[_literal(c) for c in row])
    return table


def check_utf8_file(path: str | Path, what: str) -> None:
    """A file that is not UTF-8 text is a one-line :class:`UserError` naming the line and byte (a missing file is
    left to the reader, which has its own message)."""
    p = Path(path).expanduser()
    if not p.is_file():
        return
    try:
        with p.open("rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise UserError(f"{what} '{path}' line {lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at "
                                    f"column {exc.start + 1}); save it as UTF-8 JSON lines") from None
    except OSError as exc:
        raise UserError(f"{what} '{path}': cannot read it ({exc.strerror or exc})") from None


def _check_writable_file(file: str) -> None:
    """The export target must be a file path whose folders are folders (not a folder, not below a file)."""
    dest = Path(file).expanduser()
    if dest.is_dir():
        raise UserError(f"export target '{file}' is a folder; give a file path such as {dest / 'bank.jsonl'}")
    for parent in dest.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"export target '{file}' is below '{parent}', which is a file; choose a path in "
                                "a folder")
            return


def _literal(text: str) -> Text:
    """Plain text for rich: memory text and paths are never parsed as markup."""
    return Text(text)


@memory_app.command("list")
@_user_errors
def list_cmd(
    bank: str = BankOpt,
    kind: str = typer.Option("all", "--kind", help="all, demo or lesson."),
    limit: int = typer.Option(20, "--limit", min=1, help="Most records shown."),
    sort: str = typer.Option("recent", "--sort", help="recent, useful or least_useful."),
    tag: str | None = typer.Option(None, "--tag", help="Only records with this tag."),
    as_json: bool = JsonOpt,
) -> None:
    """List records, newest, most useful or least useful first."""
    kinds = {"all": None, "demo": "demonstration", "demonstration": "demonstration", "lesson": "lesson"}
    if kind not in kinds:
        raise UserError(f"--kind {kind!r}: choose all, demo or lesson")
    if sort not in ("recent", "useful", "least_useful"):
        raise UserError(f"--sort {sort!r}: choose recent, useful or least_useful")
    with _open(bank) as b:
        recs = b.list(kinds[kind], limit, sort, tag)
    if as_json:
        _emit_json([r.to_dict() for r in recs])
        return
    _console().print(_records_table(f"{len(recs)} record(s) in {bank}", recs))


@memory_app.command("useful")
@_user_errors
def useful_cmd(
    bank: str = BankOpt,
    kind: str = typer.Option("lesson", "--kind", help="lesson, demo or all."),
    n: int = typer.Option(5, "--n", min=1, help="Records in each table."),
    as_json: bool = JsonOpt,
) -> None:
    """The most and the least useful records (usefulness = lift / (retrieved + 2): how much more often the
    episodes that saw a record succeeded than their baseline, shrunk towards 0 while evidence is thin)."""
    kinds = {"all": None, "demo": "demonstration", "demonstration": "demonstration", "lesson": "lesson"}
    if kind not in kinds:
        raise UserError(f"--kind {kind!r}: choose lesson, demo or all")
    with _open(bank) as b:
        most = b.list(kinds[kind], n, "useful")
        least = b.list(kinds[kind], n, "least_useful")
    if as_json:
        _emit_json({"most_useful": [r.to_dict() | {"usefulness": r.usefulness} for r in most],
                    "least_useful": [r.to_dict() | {"usefulness": r.usefulness} for r in least]})
        return
    console = _console()
    console.print(_records_table(f"most useful {kind} records in {bank}", most))
    console.print(_records_table(f"least useful {kind} records in {bank}", least))


@memory_app.command("show")
@_user_errors
def show_cmd(record_id: str = typer.Argument(..., metavar="ID", help="Record id (a unique prefix works)."),
             bank: str = BankOpt, as_json: bool = JsonOpt) -> None:
    """Show one record in full."""
    with _open(bank) as b:
        ids = b.store.resolve_id(record_id)
        if not ids:
            raise UserError(f"no record with id {record_id!r} in {bank}; see `critique-rl memory list`")
        if len(ids) > 1:
            raise UserError(f"id prefix {record_id!r} matches several records ({', '.join(ids[:5])}); give more")
        rec = b.get(ids[0])
    assert rec is not None
    if as_json:
        _emit_json(rec.to_dict())
        return
    table = Table(title=_literal(f"{rec.kind} {rec.id}"), show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    fields: list[tuple[str, str]] = []
    if isinstance(rec, Demonstration):
        fields += [("question", rec.question), ("trajectory", rec.trajectory), ("reward", f"{rec.reward:g}")]
    elif isinstance(rec, Lesson):
        fields += [("situation", rec.situation), ("mistake", rec.mistake), ("instead", rec.instead),
                   ("applies when", rec.applies_when), ("written from", rec.example or "-"),
                   ("source episodes", ", ".join(rec.source_ids))]
    mean_lift = f"{rec.lift / rec.retrieved:+.3f}" if rec.retrieved else "-"
    fields += [("tags", ", ".join(rec.tags)), ("source", f"{rec.source_run or '-'} step {rec.source_step}"),
               ("merged", str(rec.merged)), ("retrieved", str(rec.retrieved)), ("helped", str(rec.helped)),
               ("lift", f"{rec.lift:+.2f} (mean {mean_lift} per episode that saw it)"),
               ("usefulness", f"{rec.usefulness:+.3f} (lift / (retrieved + 2))"),
               ("created", _when(rec.created_at)), ("updated", _when(rec.updated_at)),
               ("as prompt text", rec.render())]
    for k, v in fields:
        table.add_row(k, _literal(v))
    _console().print(table)


@memory_app.command("search")
@_user_errors
def search_cmd(
    text: str = typer.Argument(..., help="Query text (e.g. a question)."),
    bank: str = BankOpt,
    k: int = typer.Option(5, "--k", min=1, help="Results per kind."),
    kind: str = typer.Option("all", "--kind", help="all, demo or lesson."),
    embeddings: str = typer.Option("auto", "--embeddings", help="auto, sentence_transformers or lexical."),
    as_json: bool = JsonOpt,
) -> None:
    """Search the bank as retrieval would (counts are not changed)."""
    kinds = {"all": None, "demo": "demonstration", "demonstration": "demonstration", "lesson": "lesson"}
    if kind not in kinds:
        raise UserError(f"--kind {kind!r}: choose all, demo or lesson")
    if embeddings not in ("auto", "sentence_transformers", "lexical"):
        raise UserError(f"--embeddings {embeddings!r}: choose auto, sentence_transformers or lexical")
    with _open(bank, embeddings=embeddings) as b:
        hits = b.search(text, k=k, kind=kinds[kind])
        backend = b.backend
    if as_json:
        _emit_json([{"score": s, **r.to_dict()} for r, s in hits])
        return
    _console().print(_records_table(f"{len(hits)} result(s) for {text!r} ({backend})",
                                   [r for r, _ in hits], [s for _, s in hits]))


@memory_app.command("stats")
@_user_errors
def stats_cmd(bank: str = BankOpt, as_json: bool = JsonOpt) -> None:
    """Counts per kind, retrieval and help totals, abstraction counters."""
    with _open(bank) as b:
        s = b.stats()
    s.pop("backend", None)  # the CLI opens banks lexically; the backend is a property of the reader
    if as_json:
        _emit_json(s)
        return
    table = Table(title=_literal(f"memory bank {s['path']} (schema v{s['schema_version']}, "
                                 f"{s['size_bytes']:,} bytes)"))
    for col in ("kind", "count", "merged", "retrieved", "helped", "helped/retrieved", "lift/retrieved", "embedded"):
        table.add_column(col, justify="left" if col == "kind" else "right")
    for kind in ("demonstrations", "lessons"):
        d = s[kind]
        ratio = f"{d['helped'] / d['retrieved']:.2f}" if d["retrieved"] else "-"
        lift = f"{d.get('lift', 0.0) / d['retrieved']:+.3f}" if d["retrieved"] else "-"
        table.add_row(kind, str(d["count"]), str(d["merged"]), str(d["retrieved"]), str(d["helped"]), ratio, lift,
                      str(d["embedded"]))
    console = _console()
    console.print(table)
    console.print(_literal(f"failures dropped by abstraction: {s['abstraction_dropped']}  "
                  f"invalid critic replies retried: {s['abstraction_invalid']}"))


@memory_app.command("export")
@_user_errors
def export_cmd(file: str = typer.Argument(..., metavar="FILE.jsonl"), bank: str = BankOpt,
               as_json: bool = JsonOpt) -> None:
    """Write every record as JSON lines (no embeddings)."""
    _check_writable_file(file)
    with _open(bank) as b:
        try:
            n = b.export_jsonl(file)
        except OSError as exc:
            raise UserError(f"cannot write '{file}': {exc.strerror or exc}; choose another FILE.jsonl") from None
    if as_json:
        _emit_json({"exported": n, "file": file})
    else:
        _console().print(_literal(f"exported {n} record(s) to {file}"))


@memory_app.command("import")
@_user_errors
def import_cmd(file: str = typer.Argument(..., metavar="FILE.jsonl"), bank: str = BankOpt,
               as_json: bool = JsonOpt) -> None:
    """Add records from a JSONL export (creates the bank if needed; existing ids are skipped)."""
    check_utf8_file(file, "import file")
    with _open(bank, create=True) as b:
        res = b.import_jsonl(file)
    if as_json:
        _emit_json({**res, "bank": bank})
    else:
        _console().print(_literal(f"imported {res['imported']} record(s) into {bank} "
                                  f"({res['skipped']} already there)"))


@memory_app.command("prune")
@_user_errors
def prune_cmd(
    bank: str = BankOpt,
    max_age_days: float | None = typer.Option(None, "--max-age-days", help="Remove records unused this long."),
    min_helped_ratio: float | None = typer.Option(None, "--min-helped-ratio",
                                                  help="Remove records helping less often than this."),
    min_retrieved: int = typer.Option(5, "--min-retrieved",
                                      help="Judge the helped ratio / usefulness only after this many retrievals."),
    min_usefulness: float | None = typer.Option(
        None, "--min-usefulness", help="Remove records whose mean lift per episode (success minus baseline) is "
        "below this, once retrieved --min-retrieved times (0: records that did worse than the baseline)."),
    useless_after_days: float | None = typer.Option(
        None, "--useless-after-days", help="Remove records at least this old whose usefulness is <= 0 "
        "(never retrieved, or no better than the baseline)."),
    keep: int | None = typer.Option(None, "--keep", help="Keep only the N most useful records of each kind."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be removed; change nothing."),
    as_json: bool = JsonOpt,
) -> None:
    """Remove stale or unhelpful records."""
    with _open(bank) as b:
        res = b.prune(max_age_days=max_age_days, min_helped_ratio=min_helped_ratio, keep=keep,
                      min_retrieved=min_retrieved, dry_run=dry_run, min_usefulness=min_usefulness,
                      useless_after_days=useless_after_days)
    if as_json:
        _emit_json({"removed": len(res.removed), "ids": res.removed, "by_reason": res.by_reason,
                    "dry_run": res.dry_run})
        return
    verb = "would remove" if dry_run else "removed"
    reasons = ", ".join(f"{k}: {v}" for k, v in res.by_reason.items())
    _console().print(_literal(f"{verb} {len(res.removed)} record(s) ({reasons})"))
