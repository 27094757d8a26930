"""`critique-rl memory ...` commands through typer's CliRunner on an app that adds memory_app."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from critique_rl.cli_memory import memory_app
from critique_rl.config import MemoryConfig
from critique_rl.memory import MemoryBank
from critique_rl.memory.store import SCHEMA_VERSION

app = typer.Typer()
app.add_typer(memory_app, name="memory")
runner = CliRunner()


@pytest.fixture
def bank_path(tmp_path: Path) -> str:
    path = tmp_path / "bank.sqlite"
    with MemoryBank(path, MemoryConfig(embeddings="lexical")) as b:
        b.record(task="12+13=", trajectory="25", reward=1.0, tags=["addition"])
        b.record(task="47+38=", trajectory="75", reward=0.0, task_name="addition", episode_id="ep-7")
        b.record(task="rev:abc=", trajectory="cba", reward=1.0, tags=["reverse"])
    return str(path)


def run(*args: str):
    return runner.invoke(app, ["memory", *args], env={"COLUMNS": "200"})


def test_list_json_and_table(bank_path: str) -> None:
    res = run("list", "--bank", bank_path, "--json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert len(rows) == 3 and {r["kind"] for r in rows} == {"demonstration", "lesson"}
    res = run("list", "--bank", bank_path, "--kind", "lesson", "--json")
    assert [r["kind"] for r in json.loads(res.stdout)] == ["lesson"]
    table = run("list", "--bank", bank_path)
    assert table.exit_code == 0 and "lesson" in table.stdout and "3 record(s)" in table.stdout


def test_show_by_prefix_and_unknown_id(bank_path: str) -> None:
    lesson_id = json.loads(run("list", "--bank", bank_path, "--kind", "lesson", "--json").stdout)[0]["id"]
    res = run("show", lesson_id[:6], "--bank", bank_path, "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["source_ids"] == ["ep-7"]
    res = run("show", lesson_id, "--bank", bank_path)
    assert res.exit_code == 0 and "carry 1 into the tens" in res.stdout
    res = run("show", "L-nope", "--bank", bank_path)
    assert res.exit_code == 2 and "no record" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_search_stats(bank_path: str) -> None:
    res = run("search", "47+21=", "--bank", bank_path, "--embeddings", "lexical", "--json")
    assert res.exit_code == 0, res.output
    hits = json.loads(res.stdout)
    assert hits[0]["question"] == "12+13=" or hits[0]["kind"] == "lesson"
    assert all(h["retrieved"] == 0 for h in hits)  # searching does not count as retrieval
    res = run("stats", "--bank", bank_path, "--json")
    s = json.loads(res.stdout)
    assert (s["demonstrations"]["count"], s["lessons"]["count"], s["schema_version"]) == (2, 1, SCHEMA_VERSION)
    assert "demonstrations" in run("stats", "--bank", bank_path).stdout


def test_export_import_prune(bank_path: str, tmp_path: Path) -> None:
    out = tmp_path / "e.jsonl"
    res = run("export", str(out), "--bank", bank_path, "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["exported"] == 3
    new_bank = tmp_path / "new" / "b.sqlite"
    res = run("import", str(out), "--bank", str(new_bank), "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["imported"] == 3
    res = run("prune", "--bank", str(new_bank), "--keep", "1", "--dry-run", "--json")
    assert json.loads(res.stdout)["removed"] == 1  # one extra demonstration
    assert len(json.loads(run("list", "--bank", str(new_bank), "--json").stdout)) == 3
    res = run("prune", "--bank", str(new_bank), "--keep", "1")
    assert res.exit_code == 0 and "removed 1" in res.stdout
    res = run("prune", "--bank", str(new_bank))
    assert res.exit_code == 2 and "at least one" in res.stderr


@pytest.mark.parametrize("cmd", [["list"], ["show", "L-1"], ["search", "x"], ["stats"], ["export", "o.jsonl"],
                                 ["prune", "--keep", "1"]])
def test_missing_bank_is_one_line_error_and_not_created(tmp_path: Path, cmd: list[str]) -> None:
    missing = tmp_path / "nope.sqlite"
    res = run(*cmd, "--bank", str(missing))
    assert res.exit_code == 2
    assert "does not exist" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not missing.exists()


def test_import_bad_file_is_user_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    res = run("import", str(bad), "--bank", str(tmp_path / "b.sqlite"))
    assert res.exit_code == 2 and "bad.jsonl:1" in res.stderr


def test_memory_text_is_not_rich_markup(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite"
    with MemoryBank(path, MemoryConfig(embeddings="lexical")) as b:
        b.record(task="[bold red]boom[/bold red] {{ 7*7 }}", trajectory="x", reward=1.0)
    res = run("list", "--bank", str(path))
    assert "[bold red]boom" in res.stdout and "{{ 7*7 }}" in res.stdout
