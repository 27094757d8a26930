"""Reading a run config file safely: size, value-count (YAML aliases expanded) and depth limits, UTF-8, and one
line naming the file for every way it can be unreadable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from critique_rl.errors import UserError

MAX_CONFIG_BYTES = 1 << 20
"""Largest config file read (a run config is a few KB; data belongs in train_file)."""
MAX_CONFIG_NODES = 100_000
"""Most values a config may expand to, YAML aliases counted at every use (bounds an alias bomb)."""
MAX_CONFIG_DEPTH = 64


def _expanded_nodes(data: Any, path: str) -> int:
    """Values in ``data`` with YAML aliases expanded (shared sub-trees counted at each use, memoised, so this is
    linear in the file), raising UserError past :data:`MAX_CONFIG_NODES`, on a recursive alias or deep nesting."""
    memo: dict[int, int] = {}
    active: set[int] = set()

    def size(x: Any, depth: int) -> int:
        if not isinstance(x, (list, dict)):
            return 1
        if depth > MAX_CONFIG_DEPTH:
            raise UserError(f"config file '{path}' nests more than {MAX_CONFIG_DEPTH} levels deep; flatten it")
        key = id(x)
        if key in active:
            raise UserError(f"config file '{path}' holds a recursive YAML alias (a value that contains itself)")
        if key in memo:
            return memo[key]
        active.add(key)
        items = list(x.keys()) + list(x.values()) if isinstance(x, dict) else x
        total = 1
        for item in items:
            total += size(item, depth + 1)
            if total > MAX_CONFIG_NODES:
                raise UserError(f"config file '{path}' expands to more than {MAX_CONFIG_NODES} values (YAML "
                                "aliases counted at every use); a run config is small: remove the aliases or the "
                                "data (data belongs in train_file)")
        active.discard(key)
        memo[key] = total
        return total

    return size(data, 0)


def _read_yaml(path: str | Path) -> Any:
    p = Path(path)
    if p.is_dir():
        raise UserError(f"config file '{path}' is a folder; pass a YAML file, or no argument for the demo")
    if not p.is_file():
        raise UserError(f"config file '{path}' does not exist; pass a YAML file or no argument for the demo")
    try:
        size = p.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise UserError(f"config file '{path}' is {size / 1e6:.1f} MB; a run config is at most "
                            f"{MAX_CONFIG_BYTES >> 20} MiB (put data in train_file, not in the config)")
        raw = p.read_bytes()
    except OSError as exc:
        raise UserError(f"config file '{path}': cannot read it ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"config file '{path}' is not UTF-8 text (byte {raw[exc.start]:#04x} at offset "
                        f"{exc.start}); save it as UTF-8") from None
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        data = yaml.load(text, Loader=loader)  # noqa: S506 - a safe loader (libyaml's when available)
    except yaml.YAMLError as exc:
        first = " ".join(str(exc).split("\n")[0].split())[:200]
        raise UserError(f"config file '{path}' is not valid YAML: {first}") from None
    except RecursionError:
        raise UserError(f"config file '{path}' nests too deeply to read; flatten it") from None
    _expanded_nodes(data, str(path))
    return data
