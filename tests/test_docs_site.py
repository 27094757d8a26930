"""The README stays short and starts with the two commands; its Python example runs; the generated
configuration reference lists every config field; the docs navigation names only pages that exist."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

INSTALL_AND_DEMO = ('python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && '
                    'pip install -e ".[dev,embeddings,lora,trackers,math]" && critique-rl train')
TESTS = ". .venv/bin/activate && python -m pytest"


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", ROOT / "scripts" / "gen_config_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_is_at_most_200_lines():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= 200, f"README.md has {n} lines; move detail into docs/ (target <= 200)"


def test_readme_starts_with_the_two_commands():
    text = README.read_text(encoding="utf-8")
    blocks = _code_blocks(text, "bash")
    assert len(blocks) >= 2
    first, second = (b.strip().splitlines()[-1] for b in blocks[:2])
    assert first == INSTALL_AND_DEMO
    assert second == TESTS
    # nothing but the title and the one-paragraph description comes before them
    before = text[: text.index("```bash")]
    assert "## " not in before and len(before.splitlines()) <= 8


def test_readme_links_point_at_files_that_exist():
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(((?!https?://)[^)#]+)(?:#[^)]*)?\)", text)
    assert targets, "README links into the docs"
    missing = [t for t in targets if not (ROOT / t).exists()]
    # pages owned by other work are placeholders in the site until they land (scripts/docs_placeholder_pages.py)
    placeholders = {f"docs/{p}" for p in _placeholder_pages()}
    assert [t for t in missing if t not in placeholders] == []


def _placeholder_pages() -> list[str]:
    spec = importlib.util.spec_from_file_location("docs_placeholder_pages", ROOT / "scripts" / "docs_placeholder_pages.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.PLACEHOLDERS)


def _nav_pages(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [p for item in node for p in _nav_pages(item)]
    if isinstance(node, dict):
        return [p for v in node.values() for p in _nav_pages(v)]
    return []


def test_every_nav_page_exists_or_is_generated():
    cfg = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    generated = {_load_generator().PAGE, *_placeholder_pages()}
    pages = _nav_pages(cfg["nav"])
    assert pages
    missing = [p for p in pages if not (ROOT / "docs" / p).is_file() and p not in generated]
    assert missing == []
    # and every page in docs/ is in the navigation (no orphan pages)
    on_disk = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert sorted(on_disk - set(pages)) == []


def test_config_reference_lists_every_field_with_its_default():
    from critique_rl.config import TrainConfig

    gen = _load_generator()
    page = gen.render()
    for f in dataclasses.fields(TrainConfig):
        assert f"| `{f.name}` |" in page, f"TrainConfig.{f.name} missing from the configuration reference"
    for section, cls in gen._nested(TrainConfig):
        prefix = f"{section}[i]." if section == "phases" else f"{section}."
        for f in dataclasses.fields(cls):
            assert f"| `{prefix}{f.name}` |" in page, f"{prefix}{f.name} missing from the configuration reference"
    # a field's default is shown as the code has it
    assert "| `num_generations` | int<br>`8` |" in page
    # every field has a description (its docstring, or the generator's fallback for undocumented fields)
    undocumented_rows = [line for line in page.splitlines() if line.startswith("| `") and line.endswith("| - |")]
    assert undocumented_rows == []


def test_config_reference_fallbacks_name_real_fields():
    from critique_rl.config import TrainConfig

    gen = _load_generator()
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for section, cls in gen._nested(TrainConfig):
        names |= {f"{section}.{f.name}" for f in dataclasses.fields(cls)}
    assert sorted(set(gen.FALLBACK_DOCS) - names) == []


def test_field_docs_are_read_from_the_source():
    gen = _load_generator()

    @dataclasses.dataclass
    class Example:
        alpha: int = 1
        """The first one."""
        beta: str = "x"
        gamma: float = 0.5
        """Spans
        two lines."""

    docs = gen.field_docs(Example)
    assert docs == {"alpha": "The first one.", "gamma": "Spans\ntwo lines."}


def test_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's Python example, with its step counts cut down so it runs in seconds."""
    block = _code_blocks(README.read_text(encoding="utf-8"), "python")[0]
    small = {"sft_steps=300": "sft_steps=2", "max_steps=20": "max_steps=1", "eval_n=100": "eval_n=4",
             "num_generations=8, generation_batch_size=64,": "num_generations=4, generation_batch_size=16, mini_batch_size=16,", "range(10, 90)": "range(10, 20)"}
    for old, new in small.items():
        assert old in block, f"the README example no longer contains {old!r}; update this test"
        block = block.replace(old, new)
    monkeypatch.chdir(tmp_path)
    printed: list[tuple] = []
    namespace = {"print": lambda *a, **k: printed.append(a), "__name__": "readme_example"}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own README's code block
    summary = namespace["summary"]
    assert 0.0 <= summary["eval_accuracy_before_rl"] <= 1.0
    assert 0.0 <= summary["eval_accuracy_after_rl"] <= 1.0
    assert printed and printed[0][1] == "->"
    assert (tmp_path / "runs" / "quick" / "metrics.jsonl").stat().st_size > 0


def test_rst_roles_are_stripped_from_rendered_docstrings():
    spec = importlib.util.spec_from_file_location("docs_rst_roles", ROOT / "scripts" / "docs_rst_roles.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    html = "see :func:<code>parse_verdict</code> and :meth:<code>BaseCritic.metrics</code>; a:b:<code>x</code>"
    assert module.strip_roles(html) == ("see <code>parse_verdict</code> and <code>BaseCritic.metrics</code>; "
                                        "a:b:<code>x</code>")


def test_trl_mapping_names_real_fields():
    """Every critique-rl key that the TRL mapping page names (first code span of its second column) is a field."""
    from critique_rl.config import TrainConfig

    gen = _load_generator()
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for section, cls in gen._nested(TrainConfig):
        names |= {f"{section}.{f.name}" for f in dataclasses.fields(cls)}
    checked, unknown = 0, []
    for line in (ROOT / "docs" / "trl.md").read_text(encoding="utf-8").splitlines():
        if not line.startswith("| ") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        spans = re.findall(r"`([^`]+)`", cells[1]) if len(cells) > 1 else []
        if not spans or spans[0].endswith("="):  # a Python argument (tokenizer=), not a config key
            continue
        key = re.split(r"[: =]", spans[0])[0]
        if re.fullmatch(r"[a-z_]+(\.[a-z_]+)?", key):
            checked += 1
            if key not in names:
                unknown.append(key)
    assert checked > 30 and unknown == []


def test_training_page_shows_the_tested_example():
    readme = _code_blocks(README.read_text(encoding="utf-8"), "python")[0]
    page = _code_blocks((ROOT / "docs" / "training.md").read_text(encoding="utf-8"), "python")[0]
    assert page == readme, "docs/training.md's first Python example must be the README's (the one the test runs)"


def test_files_the_docs_name_exist():
    """Every script, config, template or test that README.md or a docs page names (the commands behind the
    claims) is a file in the repository."""
    pattern = re.compile(r"(?<![\w./-])((?:examples|benchmarks|scripts|tests|critique_rl|prompts|memory)/[\w./-]+"
                         r"\.(?:py|yaml|sh|j2|jsonl))")
    pages = [README, *sorted((ROOT / "docs").rglob("*.md"))]
    named = {(page.name, m) for page in pages for m in pattern.findall(page.read_text(encoding="utf-8"))}
    assert len(named) > 50
    assert sorted((page, m) for page, m in named if not (ROOT / m).is_file()) == []


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
