"""MkDocs hook: pages that other work owns get a placeholder in the build until their file exists.

``docs/data.md`` (your data and rewards) and ``docs/gpu-memory.md`` (GPU memory estimates) are written by
their own work; the navigation names them, so a build before they land would fail ``--strict`` on a missing
page. This hook adds a generated placeholder for each of them that is missing from ``docs/`` and never
touches one that exists (a file in docs/ always wins).
"""

from __future__ import annotations

from typing import Any

PLACEHOLDERS: dict[str, str] = {
    "data.md": """# Your data and rewards

*This page is being written.* Until it lands: a run trains on `train_file` (JSONL, parquet, CSV or a saved
dataset folder with `prompt` and `answer` columns) and scores completions with `reward_funcs` (registry names,
`pkg.module:fn` or `file.py:fn`, called as TRL calls reward functions). See the
[configuration reference](configuration.md) and [Train from YAML or Python](training.md).
""",
    "gpu-memory.md": """# GPU memory

*This page is being written.* Until it lands: `critique-rl estimate-memory CONFIG.yaml --gpu-gb 80` estimates
the peak GPU memory of one training step by part, without a GPU (see `critique-rl estimate-memory --help`), and
[Scaling up](scaling.md) says what the trainer keeps in memory.
""",
}


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for page, text in PLACEHOLDERS.items():
        if files.get_file_from_path(page) is None:
            files.append(File.generated(config, page, content=text))
    return files
