"""Dataset loading (JSONL, a JSON array, parquet, CSV, or a saved HF dataset dir) with a schema check of every row."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from critique_rl.errors import UserError, short_repr

REQUIRED_COLUMNS = ("prompt", "answer")


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
                            f"({type(exc).__name__}); give that folder, or a JSONL/parquet/CSV file") from None
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


def validate_rows(raw: list[Any], source: str, unit: str = "row") -> list[dict[str, Any]]:
    """Check every row: an object with a non-empty string ``prompt`` and an ``answer`` (a string, or a finite
    number, which is turned into its string). Errors name ``source``, the row (1-based, or the ``(number, row)``
    pairs' number) and the fix. Returns new dicts with ``answer`` as a string."""
    out = []
    for k, item in enumerate(raw, start=1):
        num, row = item if unit == "line" else (k, item)
        where = f"{source} {unit} {num}"
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected an object with 'prompt' and 'answer', got {type(row).__name__} "
                            f"{short_repr(row, 60)}")
        missing = [c for c in REQUIRED_COLUMNS if c not in row]
        if missing:
            raise UserError(f"{where}: missing column(s) {missing}; every row needs 'prompt' and 'answer' "
                            f"(found {short_repr(sorted(map(str, row)), 80)})")
        prompt, answer = row["prompt"], row["answer"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError(f"{where}: 'prompt' must be a non-empty string, got {type(prompt).__name__} "
                            f"{short_repr(prompt, 60)}")
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise UserError(f"{where}: 'answer' must be a string (or a number), got {type(answer).__name__} "
                            f"{short_repr(answer, 60)}")
        if isinstance(answer, float) and not math.isfinite(answer):
            raise UserError(f"{where}: 'answer' is {answer}; give the reference answer as a string or finite number")
        if isinstance(answer, float) and answer.is_integer():
            answer = int(answer)  # parquet/JSON `85.0` -> "85"
        out.append({**row, "answer": str(answer)})
    return out


def load_rows(path: str | Path, field: str = "train_file") -> list[dict[str, Any]]:
    """Rows as dicts; each needs ``prompt`` (a non-empty string) and ``answer`` (the reference, as a string).

    Every row is checked (types included); errors name the config field, the file, the row and the fix.
    """
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
    return validate_rows(raw, f"config field '{field}': {p}", unit)
