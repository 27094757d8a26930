"""scripts/gpu_check.sh, scripts/gpu_step_check.py and scripts/download_gpu_wheels.sh on a CPU machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"


def test_shell_scripts_parse_and_the_wheel_folder_is_git_ignored():
    for name in ("gpu_check.sh", "download_gpu_wheels.sh"):
        subprocess.run(["bash", "-n", str(SCRIPTS / name)], check=True)
    ignored = (REPO / ".gitignore").read_text().splitlines()
    assert "gpu_wheels/" in ignored and "gpu_check_out/" in ignored
    assert 'WHEELS="$REPO/gpu_wheels"' in (SCRIPTS / "gpu_check.sh").read_text()
    assert "DEST=gpu_wheels" in (SCRIPTS / "download_gpu_wheels.sh").read_text()


def test_wheel_list_is_pinned_and_covers_what_the_image_lacks():
    out = subprocess.run(["bash", str(SCRIPTS / "download_gpu_wheels.sh"), "--list"], check=True,
                         capture_output=True, text=True).stdout.split()
    names = {r.split("==")[0].lower().replace("_", "-") for r in out}
    assert all("==" in r for r in out)
    for needed in ("trl", "datasets", "openai", "pydantic", "pydantic-core", "typer", "rich", "pyarrow", "bm25s"):
        assert needed in names, needed
    for in_image in ("torch", "transformers", "accelerate", "peft"):  # never replaced by the carried wheels
        assert in_image not in names


def test_step_check_on_cpu_passes_and_writes_json(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=256).save_pretrained(tmp_path)
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(SCRIPTS / "gpu_step_check.py"), "--device", "cpu", "--config-dir",
                           str(tmp_path), "--tokens", "8", "--prompts", "2", "--generations", "4",
                           "--micro-batch", "4", "--out", str(out)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["status"] == "PASS" and abs(r["estimate_error"]) <= 0.15
    assert r["measured_bytes"] > 0 and r["estimate_parts"]["optimizer state"] > 0
    assert proc.stdout.strip().splitlines()[-1].startswith("PASS step_8:")


@pytest.mark.slow
def test_gpu_check_dry_run_writes_one_json_and_a_line_per_check(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("PASS ", "FAIL "))]
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [c["check"] for c in record["checks"]] == [ln.split()[1].rstrip(":") for ln in lines]
    assert len(lines) == 4 and all(ln.startswith("PASS ") for ln in lines), proc.stdout[-3000:]
    assert proc.returncode == 0
