"""Dataset loading (JSONL, parquet, CSV, or a saved HF dataset dir) with a schema check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from critique_rl.errors import UserError

REQUIRED_COLUMNS = ("prompt", "answer")


def load_rows(path: str | Path, field: str = "train_file") -> list[dict[str, Any]]:
    """Rows as dicts; each needs ``prompt`` and ``answer`` (the reference, as a string).

    Errors name the config field, the file and the fix.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"config field '{field}' = '{path}': file not found; give a JSONL/parquet file or a "
                        "dataset directory saved with save_to_disk")
    if p.is_dir():
        from datasets import load_from_disk

        rows = [dict(r) for r in load_from_disk(str(p))]
    elif p.suffix in (".jsonl", ".json"):
        rows = []
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise UserError(f"config field '{field}': {p} line {i} is not valid JSON ({exc.msg})") from None
    elif p.suffix in (".parquet", ".csv"):
        from datasets import load_dataset

        rows = [dict(r) for r in load_dataset(p.suffix[1:], data_files=str(p), split="train")]
    else:
        raise UserError(f"config field '{field}' = '{path}': unsupported format; use .jsonl, .parquet, .csv "
                        "or a saved dataset directory")
    if not rows:
        raise UserError(f"config field '{field}' = '{path}': the dataset is empty")
    missing = [c for c in REQUIRED_COLUMNS if c not in rows[0]]
    if missing:
        raise UserError(f"config field '{field}' = '{path}': missing column(s) {missing}; rows need 'prompt' "
                        f"and 'answer' (found {sorted(rows[0])})")
    for r in rows:
        r["answer"] = str(r["answer"])
    return rows
