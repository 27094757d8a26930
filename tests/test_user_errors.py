"""Errors in what users bring: their reward functions and verifiers (one block naming the function, its file:line
and the exception, their frames only, exit 2), files that are not what a flag expects (one line, exit 2), an
infinite reward (named in a warning once), --resume with nothing to resume, --base-url, `memory list` at 80
columns."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from critique_rl.cli_critique import CritiqueCommand, critique_command
from critique_rl.cli_memory import memory_app
from critique_rl.config import MemoryConfig, TrainConfig
from critique_rl.errors import UserError
from critique_rl.memory import MemoryBank
from critique_rl.rewards import Verifier, build_reward_funcs, score_rewards
from critique_rl.rewards import base as reward_base
from critique_rl.tasks import get_task
from critique_rl.train import checkpoint as ckpt
from critique_rl.user_code import UserCodeError, user_code_error

PACKAGE = str(Path(reward_base.__file__).resolve().parents[1])
QUICK = dict(tiny_hidden_size=64, tiny_heads=2, tiny_layers=1, sft_steps=0, sft_examples=64, max_steps=2,
             num_generations=4, generation_batch_size=8, mini_batch_size=8, eval_n=4, eval_batch_size=4,
             checkpoint_every=100, progress=False, log_rollouts=2)

USER_CODE = '''\
import asyncio


def helper(x):
    return 1 / x


def raises(completions, **kwargs):
    return [helper(0) for _ in completions]


async def araises(completions, **kwargs):
    await asyncio.sleep(0)
    raise KeyError("missing_field")


def one_arg(x):
    return [1.0]


def verify_raises(completion, answer):
    return int(completion) == int(answer)


def verify_three(completion, answer, extra):
    return True


def infinite(completions, **kwargs):
    return [float("-inf")] + [0.0] * (len(completions) - 1)
'''


def run_cli(*args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    """The CLI as a user runs it, in a real subprocess (exit code, stderr)."""
    return subprocess.run([sys.executable, "-m", "critique_rl.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def run_main(capfd, monkeypatch, *args: object) -> subprocess.CompletedProcess:
    """``critique-rl ARGS`` through :func:`critique_rl.cli.main` in this process (the same exit-code mapping as
    the console script, without a fresh interpreter importing torch under a loaded machine)."""
    from critique_rl.cli import main

    capfd.readouterr()
    monkeypatch.setattr(sys, "argv", ["critique-rl", *map(str, args)])
    with pytest.raises(SystemExit) as info:
        main()
    out = capfd.readouterr()
    return subprocess.CompletedProcess(args, info.value.code, out.out, out.err)


def one_line(res: subprocess.CompletedProcess, *needles: str) -> str:
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def assert_user_block(text: str, user_file: Path) -> list[str]:
    """Every line after the headline is one of the user's frames (or its source line / caret)."""
    lines = text.splitlines()
    for line in lines[1:]:
        assert line.startswith("    ") or line.startswith(f'  File "{user_file}"'), line
    assert PACKAGE not in text and "Traceback" not in text and "no running event loop" not in text
    assert "During handling" not in text
    return lines


@pytest.fixture
def user_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_CODE)
    return path


def _line_of(path: Path, needle: str) -> int:
    return next(i for i, ln in enumerate(path.read_text().splitlines(), 1) if needle in ln)


def _score(spec: str) -> torch.Tensor:
    funcs = build_reward_funcs([spec], get_task("addition"))
    return score_rewards(funcs, ["1+1="] * 2, ["2", "3"], {"answer": ["2", "2"]})


# ---------------------------------------------------------------------------------------------------------
# reward functions and verifiers

def test_reward_that_raises_names_itself_and_shows_only_user_frames(user_file: Path):
    """In Python the user's own exception propagates (their traceback, a note naming the function); the CLI's
    block (user_code_error) names the function, its file:line and the exception, with their frames only."""
    with pytest.raises(ZeroDivisionError) as info:
        _score(f"{user_file}:raises")
    assert "(raised by reward function 'raises')" in info.value.__notes__
    assert info.value.__context__ is None  # not chained to the "no running event loop" probe
    block = user_code_error(info.value)
    assert isinstance(block, UserCodeError)
    text = str(block)
    head = text.splitlines()[0]
    assert head == (f"reward function 'raises' ({user_file}:{_line_of(user_file, 'def raises')}) raised "
                    "ZeroDivisionError: division by zero")
    lines = assert_user_block(text, user_file)
    assert f'File "{user_file}", line {_line_of(user_file, "return 1 / x")}, in helper' in text
    assert lines[-1].strip() == "return 1 / x"


def test_async_reward_that_raises(user_file: Path):
    with pytest.raises(KeyError) as info:
        _score(f"{user_file}:araises")
    block = str(user_code_error(info.value))
    assert block.startswith("reward function 'araises' (") and "KeyError: 'missing_field'" in block
    assert_user_block(block, user_file)


def test_reward_with_the_wrong_signature(user_file: Path):
    with pytest.raises(UserCodeError) as info:
        _score(f"{user_file}:one_arg")
    msg = str(info.value)
    assert "\n" not in msg and f"'one_arg' ({user_file}:{_line_of(user_file, 'def one_arg')})" in msg
    assert "wrong signature: def one_arg(x)" in msg and "def one_arg(completions, **kwargs)" in msg


@pytest.mark.parametrize("source, needles", [
    ("def broken(:\n    pass\n", ["SyntaxError", ":1)"]),
    ("import math\nraise RuntimeError('boom at import')\n", ["raised RuntimeError: boom at import"]),
    ("import critique_rl_no_such_module_xyz\n", ["No module named"]),
])
def test_reward_module_that_fails_to_import(tmp_path: Path, source: str, needles: list[str]):
    path = tmp_path / "bad_module.py"
    path.write_text(source)
    with pytest.raises(UserError) as info:
        build_reward_funcs([f"{path}:fn"], get_task("addition"))
    text = str(info.value)
    assert f"'{path}:fn'" in text.splitlines()[0]
    for needle in needles:
        assert needle in text, (needle, text)
    assert PACKAGE not in text and "Traceback" not in text


def test_syntax_error_block_points_at_the_column(tmp_path: Path):
    path = tmp_path / "bad_module.py"
    path.write_text("x = 1\ndef broken(:\n    pass\n")
    with pytest.raises(UserCodeError) as info:
        build_reward_funcs([f"{path}:broken"], get_task("addition"))
    lines = str(info.value).splitlines()
    assert f"({path}:2)" in lines[0]
    assert lines[1:] == [f'  File "{path}", line 2', "    def broken(:", "               ^"]


def test_verifier_per_sample_and_batched(user_file: Path):
    from critique_rl.user_code import load_user_callable

    verify = Verifier(load_user_callable(f"{user_file}:verify_raises"))
    assert verify("2", "2") is True
    with pytest.raises(ValueError) as info:
        verify("two", "2")
    block = str(user_code_error(info.value))
    assert block.startswith(f"verifier 'verify_raises' ({user_file}:") and "ValueError" in block
    assert_user_block(block, user_file)
    with pytest.raises(UserCodeError, match="wrong signature: def verify_three"):
        Verifier(load_user_callable(f"{user_file}:verify_three"))("2", "2")
    batched = Verifier(load_user_callable(f"{user_file}:raises"))
    with pytest.raises(ZeroDivisionError) as info:
        batched.check(["q"], ["2"], {"answer": ["2"]})
    assert str(user_code_error(info.value)).startswith("verifier function 'raises'")


def test_our_own_bugs_keep_their_traceback():
    """A built-in function that fails is a bug of ours: the exception is not turned into a user error."""
    task = get_task("addition")

    def make():
        def correctness(prompts, completions, answer, **kw):
            raise ZeroDivisionError("ours")
        return correctness

    fn = make()
    fn.__code__ = fn.__code__.replace(co_filename=str(Path(PACKAGE) / "rewards" / "builtin.py"))
    with pytest.raises(ZeroDivisionError) as info:
        score_rewards([fn], ["q"], ["2"], {"answer": ["2"]})
    assert user_code_error(info.value) is None and task is not None


def test_cli_train_with_a_raising_reward_exits_2_with_one_block(tmp_path: Path, user_file: Path):
    """A real subprocess: the console script's exit code and all of its stderr."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({**QUICK, "reward_funcs": ["correctness", f"{user_file}:raises"]}))
    res = run_cli("train", cfg, "--output-dir", tmp_path / "run")
    assert res.returncode == 2, res.stderr[-3000:]
    err = res.stderr.strip()
    assert err.startswith(f"error: reward function 'raises' ({user_file}:") and "ZeroDivisionError" in err
    assert_user_block(err.removeprefix("error: "), user_file)
    assert not (tmp_path / "run" / "final").exists()


def test_cli_train_with_a_reward_module_that_does_not_parse(tmp_path: Path, capfd, monkeypatch):
    bad = tmp_path / "bad.py"
    bad.write_text("def broken(:\n    pass\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({**QUICK, "reward_funcs": [f"{bad}:broken"]}))
    res = run_main(capfd, monkeypatch, "train", cfg, "--output-dir", tmp_path / "run")
    assert res.returncode == 2, res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert lines[0].startswith(f"error: reward function '{bad}:broken': cannot import") and "SyntaxError" in lines[0]
    assert lines[1:] == [f'  File "{bad}", line 1', "    def broken(:", "               ^"]


# ---------------------------------------------------------------------------------------------------------
# an infinite reward: named in a warning the first time its step is skipped

def test_infinite_reward_is_named_once_when_its_step_is_skipped(tmp_path: Path, user_file: Path, capfd):
    from critique_rl.train.trainer import CritiqueGRPOTrainer

    reward_base._INFINITE_WARNED.clear()
    cfg = TrainConfig(**{**QUICK, "output_dir": str(tmp_path / "run"), "critique_on": "none",
                         "reward_funcs": ["correctness", f"{user_file}:infinite"]})
    CritiqueGRPOTrainer(args=cfg).train()
    err = capfd.readouterr().err
    warnings = [ln for ln in err.splitlines() if "returned -inf" in ln]
    assert len(warnings) == 1, err[-3000:]
    assert warnings[0].startswith(f"warning: reward function 'infinite' ({user_file}:")
    assert "1 of 8 completions" in warnings[0] and "skipped" in warnings[0]
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_skipped"] for r in rows if "nonfinite_skipped" in r] == [1.0, 1.0]


def test_infinite_reward_names_helper():
    names = reward_base.infinite_reward_names(torch.tensor([[1.0, float("inf")], [0.0, 2.0]]), ["a", "b"])
    assert names == ["b"]
    assert reward_base.infinite_reward_names(torch.tensor([[1.0, float("nan")]]), ["a", "b"]) == []


# ---------------------------------------------------------------------------------------------------------
# files that are not what the flag expects

def test_bank_path_that_is_not_sqlite(tmp_path: Path, capfd, monkeypatch):
    junk = tmp_path / "notes.sqlite"
    junk.write_text("these are my notes, not a database\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({**QUICK, "memory": {"enabled": True, "embeddings": "lexical",
                                                     "bank_path": str(junk)}}))
    one_line(run_main(capfd, monkeypatch, "train", cfg, "--output-dir", tmp_path / "run"), "memory.bank_path",
             "not a readable SQLite")
    assert not (tmp_path / "run").exists() and junk.read_text().startswith("these are my notes")
    one_line(run_main(capfd, monkeypatch, "memory", "stats", "--bank", junk), "not a readable SQLite bank")


memory_cli = typer.Typer()
memory_cli.add_typer(memory_app, name="memory")


def test_memory_import_of_a_non_utf8_file(tmp_path: Path):
    bad = tmp_path / "export.jsonl"
    bad.write_bytes(b'{"kind": "lesson"}\n{"x": "caf\xe9"}\n')
    res = CliRunner().invoke(memory_cli, ["memory", "import", str(bad), "--bank", str(tmp_path / "b.sqlite")])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "line 2: not UTF-8" in res.stderr and "0xe9" in res.stderr
    assert not (tmp_path / "b.sqlite").exists()


def test_memory_export_below_a_file_or_onto_a_folder(tmp_path: Path):
    bank = tmp_path / "b.sqlite"
    with MemoryBank(bank, MemoryConfig(embeddings="lexical")) as b:
        b.record(task="1+1=", trajectory="2", reward=1.0)
    (tmp_path / "afile").write_text("x")
    for target, needle in ((tmp_path / "afile" / "out.jsonl", "which is a file"), (tmp_path, "is a folder")):
        res = CliRunner().invoke(memory_cli, ["memory", "export", str(target), "--bank", str(bank)])
        assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1 and needle in res.stderr, res.output
    assert (tmp_path / "afile").read_text() == "x"


def test_critique_input_that_is_not_utf8(tmp_path: Path):
    bad = tmp_path / "in.jsonl"
    bad.write_bytes(b'{"question": "q", "response": "r"}\n\xff\xfe\n')
    app = typer.Typer()
    app.command(cls=CritiqueCommand)(critique_command)
    res = CliRunner().invoke(app, ["--input", str(bad)])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "line 2: not UTF-8" in res.stderr


@pytest.mark.parametrize("url, needle", [
    ("localhost:8000", "did you mean http://localhost:8000"),
    ("ftp://127.0.0.1/v1", "http:// or https://"),
    ("http://", "no host name"),
    ("http://127.0.0.1:99999/v1", "port"),
    ("http://127.0.0.1:8000/v1 ", "no spaces"),
    ("", "is empty"),
])
def test_critique_base_url_is_checked_before_any_request(url: str, needle: str, tmp_path: Path):
    app = typer.Typer()
    app.command(cls=CritiqueCommand)(critique_command)
    res = CliRunner().invoke(app, ["--backend", "openai", "--base-url", url, "--model", "m", "--question", "q",
                                   "--response", "r"])
    assert res.exit_code == 2 and res.stdout == "", res.output  # no fallback critique: nothing was sent
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --base-url") and needle in lines[0], lines


def test_eval_on_a_folder_without_weights(tmp_path: Path, capfd, monkeypatch):
    from critique_rl.models import build_tiny_model, build_tiny_tokenizer

    folder = tmp_path / "model"
    tok = build_tiny_tokenizer(["1+1=2"])
    build_tiny_model(tok, hidden_size=64, layers=1, heads=2).save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    one_line(run_main(capfd, monkeypatch, "eval", folder, "--n", "2"), "has a config.json but no weights")
    one_line(run_main(capfd, monkeypatch, "eval", tmp_path / "nothing-here", "--n", "2"), "does not exist")


# ---------------------------------------------------------------------------------------------------------
# --resume with nothing usable to resume

def test_resume_without_a_checkpoint_says_how_to_start_over(tmp_path: Path):
    with pytest.raises(UserError) as info:
        ckpt.resume_checkpoint(tmp_path / "run" / "checkpoints")
    msg = str(info.value)
    assert "\n" not in msg and "does not exist" in msg and "without --resume" in msg
    (tmp_path / "run").mkdir()
    with pytest.raises(UserError, match="holds no checkpoint under checkpoints/.*without --resume"):
        ckpt.resume_checkpoint(tmp_path / "run" / "checkpoints")


def test_resume_with_only_damaged_checkpoints(tmp_path: Path):
    from critique_rl.models import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer(["1+1=2"])
    model = build_tiny_model(tok, hidden_size=64, layers=1, heads=2)
    root = tmp_path / "run" / "checkpoints"
    good = ckpt.save_checkpoint(root, 1, model, tok, {"x": 1})
    assert ckpt.resume_checkpoint(root) == good
    weights = good / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    warned: list[str] = []
    with pytest.raises(UserError) as info:
        ckpt.resume_checkpoint(root, warn=warned.append)
    assert "checkpoint-000001" in str(info.value) and f"delete {root}" in str(info.value)
    assert len(warned) == 1 and "damaged" in warned[0]


# ---------------------------------------------------------------------------------------------------------
# memory list at 80 columns: the lesson text gets the width

def test_memory_list_at_80_columns_gives_the_text_the_width(tmp_path: Path):
    bank = tmp_path / "b.sqlite"
    with MemoryBank(bank, MemoryConfig(embeddings="lexical")) as b:
        b.record(task="47+38=", trajectory="75", reward=0.0, task_name="addition", episode_id="ep-1")
        lesson = next(r for r in b.list("lesson"))
    text = " ".join(lesson.render().split())
    res = CliRunner().invoke(memory_cli, ["memory", "list", "--bank", str(bank)], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    rows = [ln for ln in res.stdout.splitlines() if ln.startswith("│")]
    assert rows and all(len(ln) <= 80 for ln in res.stdout.splitlines())
    cells = [ln.split("│")[2].strip() for ln in rows]  # the text column
    assert min(len(c) for c in cells[:-1]) >= 30, cells  # full lines of text, not 6 characters
    assert " ".join(" ".join(cells).split()).startswith(text[:60])


def test_cli_resume_without_a_checkpoint_exits_2(tmp_path, capfd, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(QUICK))
    one_line(run_main(capfd, monkeypatch, "train", cfg, "--output-dir", tmp_path / "run", "--resume"),
             "--resume", "without --resume")
    assert not (tmp_path / "run").exists()
