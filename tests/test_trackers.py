"""report_to: TensorBoard, wandb (offline) and trackio get the same scalars, names and steps as metrics.jsonl."""

from __future__ import annotations

import json
import os
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from critique_rl.config import TrainConfig
from critique_rl.errors import ConfigError, UserError
from critique_rl.train.trackers import flat_config, resolve_trackers, scalars

RUN = """
import sys
sys.path.insert(0, {tests!r})
from conftest import FAST
from critique_rl.config import TrainConfig
from critique_rl.train.trainer import CritiqueGRPOTrainer
cfg = TrainConfig(**dict(FAST, output_dir={out!r}, report_to=["all"], sft_steps=5, max_steps=2))
CritiqueGRPOTrainer(args=cfg).train()
"""


def _by_step(rows: list[dict]) -> dict[int, dict[str, float]]:
    """metrics.jsonl rows merged per step, numeric scalars only (what the trackers receive)."""
    merged: dict[int, dict[str, float]] = {}
    for row in rows:
        merged.setdefault(int(row["step"]), {}).update(scalars(row))
    return merged


def _wandb_history(run_file: Path) -> dict[int, dict[str, float]]:
    """History rows of an offline wandb run: its .wandb file is a LevelDB-style log of protobuf records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, records, part = 7, [], b""
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:  # block trailer padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            part = chunk
        elif kind == 3:
            part += chunk
        elif kind == 4:
            records.append(part + chunk)
    history: dict[int, dict[str, float]] = {}
    for raw in records:
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item}
            history.setdefault(int(row.pop("_step")), {}).update(row)
    return history


def _tensorboard(logdir: Path) -> dict[int, dict[str, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    out: dict[int, dict[str, float]] = {}
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):
            out.setdefault(event.step, {})[tag] = event.value
    return out


def _trackio(db: Path) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    with sqlite3.connect(db) as conn:
        for step, blob in conn.execute("SELECT step, metrics FROM metrics"):
            out.setdefault(int(step), {}).update(json.loads(blob))
    return out


def _assert_same(name: str, got: dict[int, dict[str, float]], want: dict[int, dict[str, float]]) -> None:
    assert sorted(got) == sorted(want), f"{name}: steps {sorted(got)} vs metrics.jsonl {sorted(want)}"
    for step, row in want.items():
        assert set(got[step]) >= set(row), f"{name} step {step} lacks {sorted(set(row) - set(got[step]))[:5]}"
        for key, value in row.items():
            assert got[step][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, step, key)


def test_all_trackers_get_the_metrics_jsonl_scalars(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, WANDB_MODE="offline", TRACKIO_DIR=str(tmp_path / "trackio"), HF_HOME=str(tmp_path / "hf"),
               OMP_NUM_THREADS="1")
    env.pop("WANDB_API_KEY", None)
    code = RUN.format(tests=str(Path(__file__).parent), out=str(out))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = _by_step([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()])
    assert sorted(want) == [0, 1, 2] and "train/accuracy" in want[1] and "eval/accuracy" in want[2]

    _assert_same("tensorboard", _tensorboard(out / "tensorboard" / "critique-rl"), want)
    [run_file] = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    _assert_same("wandb", _wandb_history(run_file), want)
    _assert_same("trackio", _trackio(tmp_path / "trackio" / "critique-rl.db"), want)


def test_report_to_is_validated_with_the_fix_in_the_message():
    with pytest.raises(ConfigError, match="report_to.*'mlflw' is not a tracker"):
        TrainConfig(report_to=["mlflw"])
    with pytest.raises(ConfigError, match="`all` stands alone"):
        TrainConfig(report_to=["all", "wandb"])
    assert resolve_trackers(["all"]) == ["tensorboard", "wandb", "trackio"]
    assert resolve_trackers(["wandb", "wandb"]) == ["wandb"]


def test_a_missing_tracker_package_is_a_one_line_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match=r"'wandb' package is not installed; pip install \"critique-rl\[trackers\]\""):
        resolve_trackers(["tensorboard", "wandb"])


def test_scalars_and_flat_config_keep_only_what_trackers_take():
    row = {"step": 3, "final": True, "train/accuracy": 0.5, "critique/kept": 4, "ok": True, "note": "x",
           "eval/ece": None, "loss/kl": float("nan")}
    assert scalars(row) == {"train/accuracy": 0.5, "critique/kept": 4.0, "ok": 1.0}
    flat = flat_config({"a": 1, "critic": {"kind": "cot", "timeout": 2.5, "template_dir": None}, "w": [1, 2]})
    assert flat == {"a": 1, "critic/kind": "cot", "critic/timeout": 2.5, "critic/template_dir": "None", "w": "[1, 2]"}
