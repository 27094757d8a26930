"""The malformed-input matrix: configs, datasets, templates and CLI flags a user can get wrong.

Target for every case: a one-line error (no traceback) that names the field or file and the fix, exit code 2
(the CLI maps every UserError to it; a sample goes through real subprocesses), nothing written that a later run
trusts (no config.yaml, no checkpoint). Most cases run in-process (config/data/template loading is fast); the
CLI cases spawn ``python -m critique_rl.cli``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from critique_rl.config import CriticConfig, TrainConfig, load_config
from critique_rl.data import load_rows, validate_rows
from critique_rl.errors import ConfigError, UserError
from critique_rl.templates import check_templates

MAX_LINE = 600
QUICK = dict(tiny_hidden_size=64, tiny_heads=2, tiny_layers=1, sft_steps=0, sft_examples=64, max_steps=2,
             num_generations=4, generation_batch_size=8, mini_batch_size=8, eval_n=4, eval_batch_size=4,
             checkpoint_every=100, progress=False, log_rollouts=2)
"""A run config that reaches the first RL step in a few seconds on CPU."""


def assert_one_line(exc: BaseException, *needles: str) -> str:
    msg = str(exc)
    assert isinstance(exc, UserError), f"{type(exc).__name__}: {msg}"
    assert "\n" not in msg and len(msg) < MAX_LINE, msg[:2000]
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def run_cli(*args: object, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "critique_rl.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def assert_cli_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-2000:]
    assert "Traceback" not in res.stderr and len(lines[0]) < MAX_LINE
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ---------------------------------------------------------------------------------------------------------
# 1. configs (YAML text -> load_config)

ALIAS_BOMB = "\n".join(["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
                       + [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]
                       + ["reward_kwargs: {format: {pattern: *a9}}"]) + "\n"
"""A ~1 KB billion-laughs document: 10**10 values once aliases are expanded."""

DEEP = "reward_kwargs: {format: {pattern: " + "[" * 200 + "]" * 200 + "}}\n"

CONFIG_CASES = [
    # non-finite numbers (they used to train to NaN weights or end in tracebacks)
    ("reward_weights: [.inf]\n", ["reward_weights[0]", "finite"]),
    ("learning_rate: .nan\n", ["learning_rate", "finite"]),
    ("temperature: .nan\n", ["temperature", "finite"]),
    ("learning_rate: -.inf\n", ["learning_rate", "finite"]),
    ("max_grad_norm: .inf\n", ["max_grad_norm", "finite"]),
    ("offpolicy_gamma: .nan\n", ["offpolicy_gamma", "finite"]),
    ("learning_rate: 'nan'\n", ["learning_rate", "finite"]),
    ("learning_rate: 1e400\n", ["learning_rate", "finite"]),
    ("critic: {timeout_s: .inf}\n", ["critic.timeout_s", "finite"]),
    ("memory: {dedup_threshold: .nan}\n", ["memory.dedup_threshold", "finite"]),
    ("lora: {alpha: .nan}\n", ["lora.alpha", "finite"]),
    ("reward_kwargs: {overlong: {max_length: .inf}}\n", ["reward_kwargs", "finite"]),
    # out-of-range values that were accepted or crashed later
    ("seed: 4294967296\n", ["seed", "2**32"]),
    ("seed: -1\n", ["seed"]),
    ("tiny_vocab_size: 3\n", ["tiny_vocab_size", "259"]),
    ("max_nonfinite_steps: 0\n", ["max_nonfinite_steps"]),
    ("mixed_precision: fp16\ndevice: cpu\n", ["mixed_precision", "GPU"]),
    ("critic: {template_dir: /definitely/not/here}\n", ["critic.template_dir", "not a directory"]),
    ("critic: {max_failure_share: 1.5}\n", ["critic.max_failure_share"]),
    ("critic: {circuit_breaker_failures: -1}\n", ["critic.circuit_breaker_failures"]),
    ("critic: {circuit_breaker_cooldown_s: 0}\n", ["critic.circuit_breaker_cooldown_s"]),
    ("lora: {dropout: 1.0}\n", ["lora.dropout"]),
    # types and structure
    ("learning_rate: true\n", ["learning_rate", "float"]),
    ("max_steps: 1.5\n", ["max_steps", "int"]),
    ("critic: 5\n", ["critic", "mapping"]),
    ("num_generation: 4\n", ["num_generation", "did you mean"]),
    ("num_generations: 1\n", ["num_generations"]),
    ("generation_batch_size: 30\nnum_generations: 8\n", ["generation_batch_size"]),
    ("model: /definitely/not/here\n", ["model", "save_pretrained"]),
    ("reward_weights: [1, 2]\n", ["reward_weights", "one weight per reward"]),
    ("critic: {backend: rule, kind: cot}\n", ["critic.kind"]),
    ("- a\n- b\n", ["mapping"]),
    ("learning_rate: [1, 2\n", ["not valid YAML"]),
    ("a: b\n\tc: d\n", ["not valid YAML"]),
    # hangs and huge messages
    (ALIAS_BOMB, ["aliases"]),
    ("x: &a [*a]\n", ["recursive"]),
    (DEEP, ["nests"]),
    ("learning_rate: [" + ", ".join(["0"] * 30_000) + "]\n", ["learning_rate", "..."]),
    ("reward_kwargs: {format: {pattern: [" + ", ".join(["0"] * 120_000) + "]}}\n", ["more than 100000 values"]),
]


@pytest.mark.parametrize("text, needles", CONFIG_CASES, ids=[f"config{i}" for i in range(len(CONFIG_CASES))])
def test_bad_config_is_one_line(tmp_path, text, needles):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    t0 = time.perf_counter()
    with pytest.raises(UserError) as info:
        load_config(path)
    assert time.perf_counter() - t0 < 20  # no hang (the alias bomb used to hang in the message)
    assert_one_line(info.value, *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]  # nothing written next to it


def test_recursive_alias_is_rejected(tmp_path):
    """libyaml refuses a self-referencing alias; the pure-Python loader builds a cycle, which the node count
    catches (both are one line)."""
    import yaml

    from critique_rl.config import _expanded_nodes

    data = yaml.load("x: &a [*a]\n", Loader=yaml.SafeLoader)
    with pytest.raises(UserError) as info:
        _expanded_nodes(data, "run.yaml")
    assert_one_line(info.value, "recursive")


BYTE_CASES = [
    (b"learning_rate: 1e-3\nmodel: \xff\xfe tiny\n", ["UTF-8", "0xff"]),
    (b"x" * (2 << 20), ["MiB"]),
]


@pytest.mark.parametrize("raw, needles", BYTE_CASES, ids=["non_utf8", "too_large"])
def test_unreadable_config_bytes(tmp_path, raw, needles):
    path = tmp_path / "run.yaml"
    path.write_bytes(raw)
    with pytest.raises(UserError) as info:
        load_config(path)
    assert_one_line(info.value, "run.yaml", *needles)


def test_config_path_is_a_folder(tmp_path):
    with pytest.raises(UserError) as info:
        load_config(tmp_path)
    assert_one_line(info.value, "is a folder")


def test_pasted_key_in_api_key_env_is_refused_and_never_echoed(tmp_path):
    secret = "sk-proj-Abc123DEF456ghi789JKL012mno345"
    for value in (secret, "0123456789abcdef0123456789abcdef", "hf_AbCdEfGhIjKlMnOpQrStUv"):
        path = tmp_path / "run.yaml"
        path.write_text(f"critic: {{api_key_env: '{value}'}}\n")
        with pytest.raises(ConfigError) as info:
            load_config(path, output_dir=str(tmp_path / "out"))
        msg = assert_one_line(info.value, "critic.api_key_env", "NAME of the environment variable")
        assert value not in msg
    assert not (tmp_path / "out").exists()  # config.yaml (which would hold the key) is never written
    for ok in ("OPENAI_API_KEY", "MY_CRITIC_KEY_2", "together_api_key"):
        assert CriticConfig(api_key_env=ok).api_key_env == ok


def test_empty_config_says_it_trains_the_class_defaults(tmp_path, capsys):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n")
    cfg = load_config(path)
    assert cfg == TrainConfig()
    err = capsys.readouterr().err
    assert "class defaults" in err and "1000 SFT + 100 RL steps" in err and "not the demo" in err


def test_python_api_rejects_non_finite_floats():
    with pytest.raises(ConfigError, match="reward_weights"):
        TrainConfig(reward_weights=[float("inf")])
    with pytest.raises(ConfigError, match="critic.temperature"):
        TrainConfig(critic=CriticConfig(temperature=float("nan")))
    with pytest.raises(ConfigError, match="learning_rate"):
        TrainConfig(learning_rate=float("nan"))


# ---------------------------------------------------------------------------------------------------------
# 2. datasets (train_file / eval_file / train_dataset)

GOOD = '{"prompt": "2+3=", "answer": "5"}'

JSONL_CASES = [
    (f'{GOOD}\n{{"prompt": "1+1="}}\n', ["line 2", "missing", "answer"]),
    (f'{GOOD}\n{GOOD}\n[1, 2]\n', ["line 3", "expected an object"]),
    (f'{GOOD}\n"just text"\n', ["line 2", "expected an object"]),
    (f'{GOOD}\n{{"prompt": 7, "answer": "7"}}\n', ["line 2", "'prompt' must be a non-empty string"]),
    (f'{GOOD}\n{{"prompt": null, "answer": "7"}}\n', ["line 2", "'prompt'"]),
    (f'{GOOD}\n{{"prompt": "   ", "answer": "7"}}\n', ["line 2", "'prompt'"]),
    (f'{GOOD}\n{{"prompt": ["a"], "answer": "7"}}\n', ["line 2", "'prompt'"]),
    (f'{GOOD}\n{{"prompt": "x", "answer": [1]}}\n', ["line 2", "'answer'"]),
    (f'{GOOD}\n{{"prompt": "x", "answer": null}}\n', ["line 2", "'answer'"]),
    (f'{GOOD}\n{{"prompt": "x", "answer": true}}\n', ["line 2", "'answer'"]),
    (f'{GOOD}\n{{"prompt": "x", "answer": {{"a": 1}}}}\n', ["line 2", "'answer'"]),
    (f'{GOOD}\n{{"prompt": "x", "answer": NaN}}\n', ["line 2", "'answer'"]),
    (f'{GOOD}\n{{"prompt": "x", "answer": 5\n', ["line 2", "not valid JSON"]),
    ("\n\n", ["empty"]),
    (f'{GOOD}\n' + "[" * 100_000 + "]" * 100_000 + "\n", ["line 2"]),
]


@pytest.mark.parametrize("text, needles", JSONL_CASES, ids=[f"jsonl{i}" for i in range(len(JSONL_CASES))])
def test_bad_jsonl_rows_name_the_row(tmp_path, text, needles):
    path = tmp_path / "rows.jsonl"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        load_rows(path)
    assert_one_line(info.value, "train_file", "rows.jsonl", *needles)


def _write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), str(path))


def _file_cases(tmp: Path) -> list[tuple[Path, list[str]]]:
    cases = []
    p = tmp / "latin1.jsonl"
    p.write_bytes(GOOD.encode() + b'\n{"prompt": "caf\xe9", "answer": "1"}\n')
    cases.append((p, ["line 2", "not UTF-8"]))
    p = tmp / "garbage.parquet"
    p.write_bytes(b"PAR1 this is not a parquet file at all" * 10)
    cases.append((p, ["not a readable parquet file"]))
    p = tmp / "nocol.parquet"
    _write_parquet(p, [{"prompt": "1+1=", "solution": "2"}])
    cases.append((p, ["row 1", "missing", "answer"]))
    p = tmp / "types.parquet"
    _write_parquet(p, [{"prompt": "1+1=", "answer": "2"}, {"prompt": None, "answer": "3"}])
    cases.append((p, ["row 2", "'prompt'"]))
    p = tmp / "folder"
    p.mkdir()
    (p / "notes.txt").write_text("not a dataset")
    cases.append((p, ["not a dataset saved with save_to_disk"]))
    p = tmp / "rows.csv"
    p.write_text("prompt,solution\n1+1=,2\n")
    cases.append((p, ["row 1", "missing", "answer"]))
    p = tmp / "latin1.csv"
    p.write_bytes(b"prompt,answer\ncaf\xe9,1\n")
    cases.append((p, ["not UTF-8"]))
    p = tmp / "array.json"
    p.write_text(json.dumps([{"prompt": "1+1=", "answer": "2"}, 3]))
    cases.append((p, ["row 2", "expected an object"]))
    p = tmp / "broken.json"
    p.write_text('[{"prompt": "1+1=", "answer": "2"},\n')
    cases.append((p, ["not valid JSON"]))
    p = tmp / "rows.txt"
    p.write_text(GOOD)
    cases.append((p, ["unsupported format"]))
    cases.append((tmp / "missing.jsonl", ["file not found"]))
    return cases


FILE_CASE_IDS = ["non_utf8_jsonl", "garbage_parquet", "parquet_missing_col", "parquet_null_prompt",
                 "folder_not_dataset", "csv_missing_col", "csv_non_utf8", "json_array_bad_row", "json_array_broken",
                 "txt_format", "missing_file"]


@pytest.mark.parametrize("case", range(len(FILE_CASE_IDS)), ids=FILE_CASE_IDS)
def test_bad_data_files(tmp_path, case):
    path, needles = _file_cases(tmp_path)[case]
    with pytest.raises(UserError) as info:
        load_rows(path, field="eval_file")
    assert_one_line(info.value, "eval_file", path.name, *needles)


def test_good_rows_from_every_format(tmp_path):
    rows = [{"prompt": "1+1=", "answer": 2}, {"prompt": "2+2=", "answer": "4", "extra": [1]}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "a.json").write_text(json.dumps(rows))
    _write_parquet(tmp_path / "a.parquet", [{"prompt": "1+1=", "answer": 2.0}, {"prompt": "2+2=", "answer": 4.0}])
    (tmp_path / "a.csv").write_text("prompt,answer\n1+1=,2\n2+2=,4\n")
    for name in ("a.jsonl", "a.json", "a.parquet", "a.csv"):
        got = load_rows(tmp_path / name)
        assert [(r["prompt"], r["answer"]) for r in got] == [("1+1=", "2"), ("2+2=", "4")], name


def test_python_rows_are_validated_with_the_row_number():
    with pytest.raises(UserError) as info:
        validate_rows([{"prompt": "a", "answer": "b"}, "oops"], "train_dataset")
    assert_one_line(info.value, "train_dataset row 2")


# ---------------------------------------------------------------------------------------------------------
# 3. user templates (critic.template_dir)

TEMPLATE_CASES = [
    ("refine.j2", "{{ question ", ["refine.j2", "line 1", "syntax error"]),
    ("refine.j2", "{% for x in y %}", ["refine.j2", "syntax error"]),
    ("refine.j2", '{% include "nope.j2" %}', ["refine.j2", "template not found", "nope.j2"]),
    ("refine.j2", "{{ wat }}", ["refine.j2", "undefined variable", "wat"]),
    ("refine.j2", "{{ question.__class__.__mro__ }}", ["refine.j2", "forbidden by the sandbox"]),
    ("critique_ground_truth.j2", "{{ ''.__class__.__subclasses__() }}", ["critique_ground_truth.j2", "sandbox"]),
    ("critique_indicative.j2", "{{ response }}", ["critique_indicative.j2", "undefined variable", "response"]),
    ("lesson.j2", "{% if %}", ["lesson.j2", "syntax error"]),
    ("memory_context.j2", "{{ demos | nosuchfilter }}", ["memory_context.j2", "nosuchfilter"]),
    ("critique_cot.j2", "{{ question() }}", ["critique_cot.j2"]),
]


@pytest.mark.parametrize("name, text, needles", TEMPLATE_CASES, ids=[f"tpl{i}" for i in range(len(TEMPLATE_CASES))])
def test_broken_user_template_is_one_line(tmp_path, name, text, needles):
    folder = tmp_path / f"tpl_{name}_{abs(hash(text))}"
    folder.mkdir()
    (folder / name).write_text(text)
    with pytest.raises(UserError) as info:
        check_templates(str(folder))
    assert_one_line(info.value, "critic.template_dir", *needles)


def test_non_utf8_template(tmp_path):
    (tmp_path / "refine.j2").write_bytes(b"\xff\xfe{{ question }}")
    with pytest.raises(UserError) as info:
        check_templates(str(tmp_path))
    assert_one_line(info.value, "refine.j2", "UTF-8")


def test_a_good_override_passes(tmp_path):
    (tmp_path / "refine.j2").write_text("{{ question }}{{ response }}\nHint: {{ critique }}\n{{ question }}")
    check_templates(str(tmp_path))


# ---------------------------------------------------------------------------------------------------------
# 4. run-time checks in the trainer (before anything a later run trusts is written)

def _trainer_error(tmp_path: Path, **overrides) -> tuple[str, Path]:
    from critique_rl.train.trainer import CritiqueGRPOTrainer

    out = Path(overrides.pop("output_dir", tmp_path / "run"))
    train_dataset = overrides.pop("train_dataset", None)
    cfg = TrainConfig(**{**QUICK, "output_dir": str(out), **overrides})
    with pytest.raises(UserError) as info:
        CritiqueGRPOTrainer(args=cfg, train_dataset=train_dataset).train()
    if out.is_dir():
        assert not (out / "config.yaml").exists() and not (out / "checkpoints").exists()
        assert not (out / "final").exists()
    return assert_one_line(info.value), out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_a_gpu(tmp_path):
    msg, _ = _trainer_error(tmp_path, device="cuda")
    assert "'device'" in msg and "no CUDA GPU" in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_fp16_on_cpu_is_refused_at_run_time(tmp_path):
    msg, _ = _trainer_error(tmp_path, mixed_precision="fp16")  # device auto -> CPU here
    assert "mixed_precision" in msg and "GPU" in msg


def test_output_dir_below_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    msg, _ = _trainer_error(tmp_path, output_dir=tmp_path / "afile" / "run")
    assert "output_dir" in msg and "which is a file" in msg
    msg, _ = _trainer_error(tmp_path, output_dir=tmp_path / "afile")
    assert "output_dir" in msg and "is a file" in msg


def test_broken_template_stops_before_training(tmp_path):
    tpl = tmp_path / "tpl"
    tpl.mkdir()
    (tpl / "refine.j2").write_text("{{ nope }}")
    msg, _ = _trainer_error(tmp_path, critic=CriticConfig(template_dir=str(tpl)))
    assert "refine.j2" in msg and "undefined variable" in msg


def test_unknown_task(tmp_path):
    msg, _ = _trainer_error(tmp_path, task="nope")
    assert "'task'" in msg


def test_huge_prompt_is_named_not_an_allocator_failure(tmp_path):
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(20)]
    rows.insert(7, {"prompt": "1+1= " * 200_000, "answer": "2"})  # a 1 MB prompt
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    msg, _ = _trainer_error(tmp_path, train_file=str(path))
    assert "row 8" in msg and "positions" in msg and "rows.jsonl" in msg


def test_max_new_tokens_past_the_model_positions(tmp_path):
    msg, _ = _trainer_error(tmp_path, max_new_tokens=10_000)
    assert "max_new_tokens" in msg and "256 positions" in msg


def test_python_dataset_rows_are_checked(tmp_path):
    msg, _ = _trainer_error(tmp_path, train_dataset=[{"prompt": "1+1=", "answer": "2"}, {"prompt": "x"}])
    assert "train_dataset row 2" in msg and "answer" in msg


# ---------------------------------------------------------------------------------------------------------
# 5. the CLI as a user runs it (real subprocesses: exit codes)

def test_cli_config_errors_exit_2_fast(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(ALIAS_BOMB)
    t0 = time.perf_counter()
    assert_cli_error(run_cli("train", bomb, timeout=60), "aliases")
    assert time.perf_counter() - t0 < 60
    inf = tmp_path / "inf.yaml"
    inf.write_text("reward_weights: [.inf]\n")
    assert_cli_error(run_cli("train", inf, "--output-dir", tmp_path / "out"), "reward_weights")
    assert not (tmp_path / "out").exists()
    good = tmp_path / "good.yaml"
    good.write_text("max_steps: 1\n")
    assert_cli_error(run_cli("train", good, "--seed", 2**32), "seed")


def test_cli_memory_and_critique_errors_exit_2(tmp_path):
    assert_cli_error(run_cli("memory", "list", "--bank", tmp_path / "nope.sqlite"), "does not exist")
    assert not (tmp_path / "nope.sqlite").exists()
    assert_cli_error(run_cli("critique", "--backend", "nope", "--question", "q", "--response", "r"), "--backend")
    assert_cli_error(run_cli("critique", "--question", "q", "--response", "r", "--api-key-env", "sk-live-123456789",
                             "--backend", "openai", "--model", "m"), "api_key_env")


def test_cli_eval_flag_errors_exit_2(tmp_path):
    assert_cli_error(run_cli("eval", tmp_path, "--n", "0"), "--n")
    assert_cli_error(run_cli("eval", tmp_path, "--temperature", "-1"), "--temperature")
    assert_cli_error(run_cli("eval", tmp_path, "--temperature", "nan"), "--temperature")
