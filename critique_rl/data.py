"""Datasets: files (JSONL, a JSON array, parquet, CSV, a saved HF dataset dir) or ``datasets.load_dataset``
(``dataset_name`` / ``dataset_config`` / ``dataset_split``), in TRL's two prompt formats, with every row checked.

- **standard**: ``prompt`` is a string;
- **conversational**: ``prompt`` is a list of ``{"role", "content"}`` messages (TRL's conversational format),
  rendered with the policy tokenizer's chat template (:func:`critique_rl.templates.render_conversation`).

Every row becomes a dict whose ``prompt`` is a :class:`Prompt` (a ``str``: the prompt's text, carrying its
messages, the row's other columns and its feedback text) and whose ``answer`` is the reference as a string, or
None when the data has no reference (``reference_column: null``). Every other column is kept under its own
name: reward functions, gates and critic templates receive it by name.

Errors name the config field, the file, the row and the column, and say how to fix it.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from critique_rl.errors import UserError, short_repr

REQUIRED_COLUMNS = ("prompt", "answer")
ROLES = ("system", "user", "assistant", "tool", "developer")
"""Message roles a conversational prompt may use."""


class Prompt(str):
    """A dataset row's prompt. As a ``str`` it is the prompt's text, so everything that reads a prompt as text
    (critics, the refinement template, memory, logs) keeps working; it also carries:

    - ``messages``: the conversation of a conversational prompt (None for a string prompt). The policy sees it
      rendered with its chat template; as text it is the single user message's content, or every message as
      ``Role: content`` separated by blank lines.
    - ``columns``: the row's other columns by name (critic templates receive them as variables).
    - ``feedback``: the row's ``feedback_column`` text (None without one), the critique of its wrong answers.
    - ``where``: where the row came from (for error messages).
    """

    messages: list[dict[str, Any]] | None
    columns: dict[str, Any]
    feedback: str | None
    where: str

    def __new__(cls, text: str, messages: list[dict[str, Any]] | None = None,
                columns: Mapping[str, Any] | None = None, feedback: str | None = None, where: str = "") -> Prompt:
        obj = super().__new__(cls, text)
        obj.messages = messages
        obj.columns = dict(columns or {})
        obj.feedback = feedback
        obj.where = where
        return obj

    def __reduce__(self) -> tuple[Any, ...]:  # pickling (processes, deepcopy) keeps the attributes
        return (Prompt, (str(self), self.messages, self.columns, self.feedback, self.where))

    def with_context(self, context: str) -> Prompt:
        """This prompt with ``context`` (e.g. retrieved memory) put before it: before the text of a string
        prompt, and at the start of the first user message of a conversation (system messages stay first)."""
        if not context:
            return self
        text = f"{context}\n{self}"
        if not self.messages:
            return Prompt(text, None, self.columns, self.feedback, self.where)
        messages = [dict(m) for m in self.messages]
        first = next((i for i, m in enumerate(messages) if m.get("role") == "user"), 0)
        messages[first]["content"] = f"{context}\n{message_text(messages[first].get('content'))}"
        return Prompt(conversation_text(messages), messages, self.columns, self.feedback, self.where)


def message_text(content: Any) -> str:
    """The text of a message's ``content``: a string, or TRL/OpenAI content parts (``{"type": "text",
    "text": ...}``) joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return "" if content is None else str(content)


def conversation_text(messages: list[dict[str, Any]]) -> str:
    """A conversation as plain text: the content of a single user message, else ``Role: content`` blocks."""
    if len(messages) == 1 and messages[0].get("role") == "user":
        return message_text(messages[0].get("content"))
    return "\n\n".join(f"{str(m.get('role')).capitalize()}: {message_text(m.get('content'))}" for m in messages)


@dataclass(frozen=True)
class DataOptions:
    """Which columns hold what (the config fields of the same names)."""

    prompt_column: str = "prompt"
    reference_column: str | None = "answer"
    """None: the data has no reference; every row's ``answer`` is None."""
    feedback_column: str | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> DataOptions:
        return cls(prompt_column=getattr(cfg, "prompt_column", "prompt"),
                   reference_column=getattr(cfg, "reference_column", "answer"),
                   feedback_column=getattr(cfg, "feedback_column", None))


DEFAULT_OPTIONS = DataOptions()

_SEEN_COLUMNS: set[str] = set()


def seen_columns() -> frozenset[str]:
    """Names of the columns of every row checked in this process (what critic templates may read besides their
    own variables; :func:`critique_rl.templates.check_templates` accepts them)."""
    return frozenset(_SEEN_COLUMNS)


# ----------------------------------------------------------------------------------------------------------
# reading files and datasets
# ----------------------------------------------------------------------------------------------------------

def _decode(raw: bytes, p: Path, field: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserError(f"config field '{field}': {p} line {line} is not UTF-8 (byte {raw[exc.start]:#04x}); "
                        "save the file as UTF-8") from None


def _read(p: Path, field: str) -> tuple[list[Any], str]:
    """Raw rows and how a row is named in messages (``line`` for JSONL, else ``row``)."""
    if p.is_dir():
        try:
            from datasets import DatasetDict, load_from_disk

            ds = load_from_disk(str(p))
        except Exception as exc:  # not a saved dataset: datasets raises FileNotFoundError, ValueError, ...
            raise UserError(f"config field '{field}' = '{p}': a folder, but not a dataset saved with save_to_disk "
                            f"({type(exc).__name__}); give that folder, or a JSONL/parquet/CSV file (a folder of "
                            "data files or a Hub dataset: dataset_name)") from None
        if isinstance(ds, DatasetDict):
            if "train" not in ds:
                raise UserError(f"config field '{field}' = '{p}': a DatasetDict without a 'train' split (splits: "
                                f"{sorted(ds)}); save the split you want with save_to_disk")
            ds = ds["train"]
        return [dict(r) for r in ds], "row"
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".json"):
        text = _decode(p.read_bytes(), p, field)
        if suffix == ".json" and text.lstrip().startswith("["):  # a JSON array of rows
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as exc:
                raise UserError(f"config field '{field}': {p} line {exc.lineno} is not valid JSON ({exc.msg})") from None
            return rows, "row"
        rows = []
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((i, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise UserError(f"config field '{field}': {p} line {i} is not valid JSON ({exc.msg})") from None
            except RecursionError:
                raise UserError(f"config field '{field}': {p} line {i} nests too deeply") from None
        return rows, "line"
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            return pq.read_table(str(p)).to_pylist(), "row"
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for a bad file
            raise UserError(f"config field '{field}' = '{p}': not a readable parquet file ("
                            f"{' '.join(str(exc).split())[:120]}); write it with pandas/pyarrow/datasets") from None
    if suffix == ".csv":
        text = _decode(p.read_bytes(), p, field)
        try:
            return list(csv.DictReader(io.StringIO(text))), "row"
        except csv.Error as exc:
            raise UserError(f"config field '{field}': {p} is not valid CSV ({exc})") from None
    raise UserError(f"config field '{field}' = '{p}': unsupported format; use .jsonl, .json, .parquet, .csv "
                    "or a saved dataset directory")


def load_hf_rows(name: str, config: str | None = None, split: str = "train") -> list[dict[str, Any]]:
    """Rows of ``datasets.load_dataset(name, config, split=split)``: a Hub dataset (from the local cache when
    ``HF_DATASETS_OFFLINE=1``), a local folder of data files, or a packaged builder (``json``, ``parquet``,
    ``csv``). Loading scripts (``name/name.py``) are not run: ``datasets`` >= 4 removed them."""
    where = f"config field 'dataset_name' = {name!r}"
    try:
        import datasets
    except ImportError:  # pragma: no cover - a core dependency
        raise UserError(f"{where}: the `datasets` package is not installed; pip install datasets") from None
    local = Path(name).expanduser()
    try:
        ds = datasets.load_dataset(str(local) if local.exists() else name, config, split=split)
    except Exception as exc:  # datasets raises many types: FileNotFoundError, ValueError, DatasetNotFoundError...
        message = " ".join(str(exc).split())[:300]
        low = message.lower()
        if "unknown split" in low:
            raise UserError(f"config field 'dataset_split' = {split!r}: {message}; name one of those splits") from None
        if "builderconfig" in low or "config name is missing" in low:
            raise UserError(f"config field 'dataset_config' = {config!r}: {message}; set dataset_config to one of "
                            "the dataset's configs") from None
        if "script" in low:
            raise UserError(f"{where}: {message}; datasets {datasets.__version__} does not run loading scripts "
                            "(removed in datasets 4.0): export the data to parquet or JSONL (e.g. with datasets<4: "
                            "load_dataset(...).to_parquet(...)) and give that folder or file") from None
        raise UserError(f"{where}: cannot load it ({type(exc).__name__}: {message}); give a Hub dataset id that is "
                        "cached (HF_DATASETS_OFFLINE=1) or reachable, or a local folder of data files") from None
    if isinstance(ds, datasets.DatasetDict | datasets.IterableDatasetDict):  # pragma: no cover - split is set
        raise UserError(f"config field 'dataset_split': {name!r} gave several splits {sorted(ds)}; name one")
    return [dict(r) for r in ds]


# ----------------------------------------------------------------------------------------------------------
# checking rows
# ----------------------------------------------------------------------------------------------------------

def _messages(value: list[Any], where: str, column: str) -> list[dict[str, Any]]:
    """A checked conversational prompt: a non-empty list of ``{"role", "content"}`` messages."""
    if not value:
        raise UserError(f"{where}: column '{column}' is an empty list; a conversational prompt needs at least one "
                        "{'role': 'user', 'content': ...} message")
    out = []
    for j, m in enumerate(value, start=1):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{where}: column '{column}' message {j} is {short_repr(m, 60)}; a conversational "
                            "prompt is a list of {'role': ..., 'content': ...} messages (TRL's format)")
        if m["role"] not in ROLES:
            raise UserError(f"{where}: column '{column}' message {j} has role {short_repr(m['role'], 30)}; use "
                            f"one of {', '.join(ROLES)}")
        content = m["content"]
        if not isinstance(content, str | list) or isinstance(content, list) and not all(
                isinstance(p, dict) and isinstance(p.get("text", ""), str) for p in content):
            raise UserError(f"{where}: column '{column}' message {j} content must be a string (or text parts "
                            f"[{{'type': 'text', 'text': ...}}]), got {type(content).__name__} "
                            f"{short_repr(content, 60)}")
        out.append({k: v for k, v in m.items() if v is not None})  # parquet fills absent keys with None
    if not any(message_text(m.get("content")).strip() for m in out):
        raise UserError(f"{where}: column '{column}': every message is empty")
    return out


def _reference(value: Any, where: str, column: str) -> str:
    if value is None:
        raise UserError(f"{where}: column '{column}' (the reference) is empty (null); fill it in or drop the row")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise UserError(f"{where}: '{column}' (the reference) must be a string (or a number), got "
                        f"{type(value).__name__} {short_repr(value, 60)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{where}: '{column}' is {value}; give the reference answer as a string or finite number")
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # parquet/JSON `85.0` -> "85"
    return str(value)


def check_row(row: Any, where: str, options: DataOptions = DEFAULT_OPTIONS) -> dict[str, Any]:
    """One checked row (see :func:`validate_rows`); ``where`` names it in errors."""
    pc, rc, fc = options.prompt_column, options.reference_column, options.feedback_column
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected an object with '{pc}'" + (f" and '{rc}'" if rc else "")
                        + f", got {type(row).__name__} {short_repr(row, 60)}")
    found = short_repr(sorted(map(str, row)), 80)
    if pc not in row:
        hint = "" if pc != "prompt" else "; set prompt_column to the column that holds the prompt (e.g. question)"
        raise UserError(f"{where}: missing column '{pc}' (found {found}){hint}")
    if rc is not None and rc not in row:
        raise UserError(f"{where}: missing column '{rc}' (the reference answer; found {found}); set reference_column to "
                        "the column that holds it, or reference_column: null for data without a reference")
    if fc is not None and fc not in row:
        raise UserError(f"{where}: missing column '{fc}' (feedback_column; found {found}); add it (null where a row has "
                        "no feedback) or set feedback_column to the column that holds the feedback")
    for internal, given, field in (("prompt", pc, "prompt_column"), ("answer", rc, "reference_column")):
        if given != internal and internal in row:
            raise UserError(f"{where}: has a column '{internal}' and {field} '{given}'; the trainer reads the "
                            f"{'prompt' if internal == 'prompt' else 'reference'} as '{internal}', which would hide "
                            f"yours: rename the '{internal}' column, or set {field}: {internal}")
    raw = row[pc]
    if isinstance(raw, list):
        messages = _messages(raw, where, pc)
        text = conversation_text(messages)
    elif isinstance(raw, str) and raw.strip():
        messages, text = None, raw
    else:
        raise UserError(f"{where}: '{pc}' must be a non-empty string or a list of {{'role', 'content'}} messages, "
                        f"got {type(raw).__name__} {short_repr(raw, 60)}")
    feedback = row.get(fc) if fc is not None else None
    if feedback is not None and not isinstance(feedback, str):
        raise UserError(f"{where}: column '{fc}' (feedback_column) must be a string or null, got "
                        f"{type(feedback).__name__} {short_repr(feedback, 60)}")
    answer = _reference(row[rc], where, rc) if rc is not None else None
    out = {**row, "answer": answer}
    columns = {k: v for k, v in out.items() if k not in ("prompt", pc)}
    _SEEN_COLUMNS.update(k for k in columns if isinstance(k, str))
    out["prompt"] = Prompt(text, messages, columns, feedback.strip() or None if feedback else None, where)
    return out


def validate_rows(raw: list[Any], source: str, unit: str = "row",
                  options: DataOptions = DEFAULT_OPTIONS) -> list[dict[str, Any]]:
    """Check every row: an object with a prompt (a non-empty string, or a conversational list of messages) in
    ``options.prompt_column`` and a reference (a string, or a finite number, turned into its string) in
    ``options.reference_column``. Errors name ``source``, the row (1-based, or the ``(number, row)`` pairs'
    number), the column and the fix. Returns new dicts: ``prompt`` a :class:`Prompt`, ``answer`` the reference
    as a string (None with ``reference_column`` None); every other column kept. Rows already checked (their
    ``prompt`` is a :class:`Prompt`) are kept as they are."""
    out = []
    for k, item in enumerate(raw, start=1):
        num, row = item if unit == "line" else (k, item)
        if isinstance(row, dict) and isinstance(row.get("prompt"), Prompt) and "answer" in row:
            out.append(row)
            continue
        out.append(check_row(row, f"{source} {unit} {num}", options))
    return out


def load_rows(path: str | Path, field: str = "train_file",
              options: DataOptions = DEFAULT_OPTIONS) -> list[dict[str, Any]]:
    """Rows of a file or saved dataset folder, checked by :func:`validate_rows` (types included); errors name
    the config field, the file, the row, the column and the fix."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"config field '{field}' = '{path}': file not found; give a JSONL/parquet file or a "
                        "dataset directory saved with save_to_disk")
    try:
        raw, unit = _read(p, field)
    except OSError as exc:
        raise UserError(f"config field '{field}' = '{path}': cannot read it ({exc.strerror or exc})") from None
    if not isinstance(raw, list):
        raise UserError(f"config field '{field}' = '{path}': expected rows (a JSON array or JSON lines)")
    if not raw:
        raise UserError(f"config field '{field}' = '{path}': the dataset is empty")
    return validate_rows(raw, f"config field '{field}': {p}", unit, options)


def load_split(cfg: Any, split: str, given: Any = None) -> list[dict[str, Any]] | None:
    """The checked rows of ``split`` (``train`` / ``eval``) for the run config ``cfg``, or None when the task's
    generator provides them. In order: ``given`` (a list of dicts or a ``datasets.Dataset`` passed to the
    trainer), ``<split>_file``, then (train only) ``dataset_name`` / ``dataset_config`` / ``dataset_split``
    through ``datasets.load_dataset``. ``prompt_column``, ``reference_column`` and ``feedback_column`` apply to
    all of them."""
    options = DataOptions.from_config(cfg)
    if given is not None:
        rows = validate_rows(list(given), f"{split}_dataset", options=options)
        if not rows:
            raise UserError(f"{split}_dataset is empty; pass rows with a prompt" +
                            (f" and '{options.reference_column}'" if options.reference_column else ""))
        return rows
    path = getattr(cfg, f"{split}_file", None)
    if path:
        return load_rows(path, field=f"{split}_file", options=options)
    name = getattr(cfg, "dataset_name", None)
    if split == "train" and name:
        dsplit = getattr(cfg, "dataset_split", None) or "train"
        raw = load_hf_rows(name, getattr(cfg, "dataset_config", None), dsplit)
        if not raw:
            raise UserError(f"config field 'dataset_split' = {dsplit!r}: the split of {name!r} is empty")
        return validate_rows(raw, f"config field 'dataset_name': {name} split {dsplit}", options=options)
    return None
