"""Split a folder of wheels into parts that each fit one device call's carry limit.

The device tool carries at most 64 MiB of ignored paths per call, and the wheels a bare CUDA image lacks come to
more than that (pyarrow alone is ~53 MiB). This packs ``DIR/*.whl`` first-fit-decreasing into ``DIR/part1``,
``DIR/part2``, ... each at most ``--limit-mib`` (default 56: with the repository's ~5 MiB of files a call stays
under 64), and prints one line per part. A wheel larger than the limit is an error (nothing is moved).

    python scripts/pack_wheels.py gpu_wheels [--limit-mib 60]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

MIB = 1024 * 1024


def pack(sizes: dict[str, int], limit: int) -> list[list[str]]:
    """First-fit-decreasing bin packing of ``{name: bytes}`` into parts of at most ``limit`` bytes each."""
    too_big = [n for n, s in sizes.items() if s > limit]
    if too_big:
        raise ValueError(f"{', '.join(too_big)} larger than the part limit of {limit / MIB:.0f} MiB on its own")
    parts: list[list[str]] = []
    used: list[int] = []
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        for i, u in enumerate(used):
            if u + sizes[name] <= limit:
                parts[i].append(name)
                used[i] += sizes[name]
                break
        else:
            parts.append([name])
            used.append(sizes[name])
    return parts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--limit-mib", type=float, default=56.0)
    args = ap.parse_args(argv)
    wheels = {p.name: p.stat().st_size for p in args.folder.glob("*.whl")}
    if not wheels:
        print(f"pack_wheels: no *.whl in {args.folder}", file=sys.stderr)
        return 2
    try:
        parts = pack(wheels, int(args.limit_mib * MIB))
    except ValueError as exc:
        print(f"pack_wheels: {exc}; raise --limit-mib or leave that wheel out", file=sys.stderr)
        return 2
    for i, names in enumerate(parts, 1):
        dest = args.folder / f"part{i}"
        dest.mkdir(exist_ok=True)
        for n in names:
            (args.folder / n).rename(dest / n)
        print(f"{dest}: {len(names)} wheels, {sum(wheels[n] for n in names) / MIB:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
