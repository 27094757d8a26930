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
    assert 'WHEELS="${GPU_WHEELS:-$REPO/gpu_wheels}"' in (SCRIPTS / "gpu_check.sh").read_text()
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


def test_pack_wheels_fits_every_part_under_the_limit_first_fit_decreasing():
    sys.path.insert(0, str(SCRIPTS))
    from pack_wheels import MIB, pack

    # the measured sizes of the three largest wheels (MiB) and a tail of small ones
    sizes = {"pyarrow.whl": 52.5 * MIB, "pandas.whl": 11.5 * MIB, "matplotlib.whl": 9.4 * MIB,
             **{f"small{i}.whl": 2 * MIB for i in range(10)}}
    parts = pack({k: int(v) for k, v in sizes.items()}, 56 * MIB)
    assert sorted(n for p in parts for n in p) == sorted(sizes)  # every wheel in exactly one part
    assert all(sum(sizes[n] for n in p) <= 56 * MIB for p in parts)
    assert parts[0][0] == "pyarrow.whl" and len(parts) == 2  # 52.5 + 2 + ... fills part 1, the rest fits part 2
    with pytest.raises(ValueError, match="pyarrow.whl larger than the part limit"):
        pack({"pyarrow.whl": int(52.5 * MIB)}, 50 * MIB)


def test_pack_wheels_cli_moves_wheels_into_parts(tmp_path):
    for name, mib in (("a-1-py3-none-any.whl", 3), ("b-1-py3-none-any.whl", 2), ("c-1-py3-none-any.whl", 2)):
        with open(tmp_path / name, "wb") as f:
            f.truncate(mib * 1024 * 1024)  # sparse: sizes without writing megabytes
    out = subprocess.run([sys.executable, str(SCRIPTS / "pack_wheels.py"), str(tmp_path), "--limit-mib", "4"],
                         check=True, capture_output=True, text=True).stdout
    assert sorted(p.name for p in (tmp_path / "part1").iterdir()) == ["a-1-py3-none-any.whl"]
    assert sorted(p.name for p in (tmp_path / "part2").iterdir()) == ["b-1-py3-none-any.whl", "c-1-py3-none-any.whl"]
    assert not list(tmp_path.glob("*.whl")) and out.count("MiB") == 2


def test_install_only_finds_wheels_in_parts_and_stops_before_the_checks(tmp_path):
    wheels, out = tmp_path / "wheels", tmp_path / "out"
    (wheels / "part2").mkdir(parents=True)
    # a package nobody has installed (pip is asked to install it and fails on the fake file: nothing changes)
    (wheels / "part2" / "zz_not_installed_pkg-1.0-py3-none-any.whl").write_bytes(b"not a zip")
    (wheels / "part2" / "rich-0.0.1-py3-none-any.whl").write_bytes(b"installed already: skipped")
    proc = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), "--install-only", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**__import__("os").environ, "GPU_WHEELS": str(wheels), "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    listed = (out / "wheels_to_install.txt").read_text().split()
    assert [Path(p).name for p in listed] == ["zz_not_installed_pkg-1.0-py3-none-any.whl"]
    assert "--install-only: 1 wheel(s)" in proc.stdout and not (out / "tests.log").exists()
