"""The ``critique`` command, registered on a small Typer app (as critique_rl/cli.py registers it)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from critic_server import CriticServer
from typer.testing import CliRunner

from critique_rl.cli_critique import CritiqueCommand, critique_command

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def app() -> typer.Typer:
    app = typer.Typer()
    app.command(cls=CritiqueCommand)(critique_command)
    return app


@pytest.fixture(autouse=True)
def _no_real_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_line_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_rule_single_request(app):
    result = CliRunner().invoke(app, ["--question", "47+38=", "--response", "84", "--reference", "85",
                                      "--no-verdict"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["text"] == "Your answer 84 is incorrect. The correct answer is 85."
    assert data["verdict"] is False and data["kind"] == "ground_truth" and data["fallback"] is False
    assert isinstance(data["latency"], float)


def test_rule_indicative_with_verdict(app):
    result = CliRunner().invoke(app, ["--kind", "indicative", "--question", "q", "--response", "7", "--verdict"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["text"] == "Your answer 7 is correct."


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--backend", "vllm", "--question", "q", "--response", "r"], "--backend"),
        (["--kind", "cot", "--question", "q", "--response", "r"], "--kind cot"),
        (["--question", "q"], "--response"),
        (["--backend", "openai", "--question", "q", "--response", "r"], "--model"),
        (["--timeout", "soon", "--question", "q", "--response", "r"], "--timeout"),
        (["--max-retries", "-1", "--question", "q", "--response", "r"], "--max-retries"),
        (["--bogus-flag"], "--bogus-flag"),
        (["--input", "/nonexistent/in.jsonl"], "/nonexistent/in.jsonl"),
        (["--backend", "hf", "--model", "/nonexistent/model", "--question", "q", "--response", "r"], "config.json"),
        (["--backend", "openai", "--model", "gpt-4o-mini", "--question", "q", "--response", "r"], "OPENAI_API_KEY"),
    ],
)
def test_bad_flags_exit_2_with_one_line(app, args, needle):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert needle in one_line_error(result)
    assert "Traceback" not in result.output


def test_unreachable_server_single_request_falls_back_and_exits_2(app):
    url = f"http://127.0.0.1:{free_port()}/v1"
    result = CliRunner().invoke(app, ["--backend", "openai", "--base-url", url, "--model", "m", "--question",
                                      "47+38=", "--response", "84", "--reference", "85", "--no-verdict",
                                      "--timeout", "0.5", "--max-retries", "0"])
    assert result.exit_code == 2
    assert url in one_line_error(result)
    data = json.loads(result.stdout)
    assert data["fallback"] is True and data["text"] == "Your answer 84 is incorrect. The correct answer is 85."


def test_openai_batch_input_output(app, tmp_path: Path):
    rows = [
        {"question": "47+38=", "response": "84", "reference": "85", "verdict": False},
        {"prompt": "12+30=", "completion": "42", "answer": "42", "verdict": True},
    ]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out" / "crit.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    def respond(body: dict) -> dict:
        prompt = body["messages"][-1]["content"]
        return {"content": "Carry error.\nVerdict: incorrect" if "47+38" in prompt else "Fine.\nVerdict: correct"}

    with CriticServer(responder=respond) as server:
        result = CliRunner().invoke(app, ["--backend", "openai", "--base-url", server.base_url, "--model", "m",
                                          "--input", str(src), "--output", str(dst), "--timeout", "1"])
    assert result.exit_code == 0, result.output
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [o["verdict"] for o in out] == [False, True]
    assert all(o["kind"] == "cot" and not o["fallback"] for o in out)


def test_batch_all_failed_exits_2(app, tmp_path: Path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"question": "q", "response": "r", "verdict": False}) + "\n")
    with CriticServer([{"status": 500}]) as server:
        result = CliRunner().invoke(app, ["--backend", "openai", "--base-url", server.base_url, "--model", "m",
                                          "--input", str(src), "--max-retries", "0"])
    assert result.exit_code == 2
    assert server.base_url in one_line_error(result)
    assert json.loads(result.stdout.splitlines()[0])["fallback"] is True


def test_bad_jsonl_line_is_named(app, tmp_path: Path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"question": "q", "response": "r"}\n{oops\n')
    result = CliRunner().invoke(app, ["--input", str(src)])
    assert result.exit_code == 2
    assert "line 2" in one_line_error(result)


def test_subprocess_python_c():
    code = (
        "import typer; from critique_rl.cli_critique import CritiqueCommand, critique_command; "
        "app = typer.Typer(); app.command(cls=CritiqueCommand)(critique_command); app()"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    ok = subprocess.run([sys.executable, "-c", code, "--question", "47+38=", "--response", "84", "--reference",
                         "85", "--no-verdict"], capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["text"] == "Your answer 84 is incorrect. The correct answer is 85."
    bad = subprocess.run([sys.executable, "-c", code, "--backend", "nope"], capture_output=True, text=True,
                         timeout=60, cwd=REPO, env=env)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("error: ")
    assert bad.stdout == ""
