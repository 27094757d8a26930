"""The named layout: templates live in the top-level ``prompts/`` folder and are packaged into the wheel from
there as ``critique_rl/prompts/*.j2``; the template loader finds them in a checkout and in an installed wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import critique_rl
from critique_rl.templates import PACKAGED_PROMPTS, TEMPLATE_VARIABLES, packaged_prompts_dir, render

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = {"critique_cot.j2", "critique_ground_truth.j2", "critique_indicative.j2", "lesson.j2",
            "memory_context.j2", "refine.j2", "judge_group.j2"}


def test_templates_live_in_the_top_level_prompts_folder():
    assert {p.name for p in (ROOT / "prompts").glob("*.j2")} == EXPECTED
    assert not (ROOT / "critique_rl" / "prompts").exists()  # one copy, where the design card names it
    assert packaged_prompts_dir() == PACKAGED_PROMPTS == (ROOT / "prompts").resolve()
    assert {p.name for p in PACKAGED_PROMPTS.glob("*.j2")} == EXPECTED
    assert set(TEMPLATE_VARIABLES) == EXPECTED
    for name, variables in TEMPLATE_VARIABLES.items():
        assert render(name, **variables)


def test_pyproject_lists_every_subpackage_and_maps_prompts():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "critique_rl").rglob("__init__.py")}
    assert set(cfg["packages"]) == on_disk | {"critique_rl.prompts"}
    assert cfg["package-dir"] == {"critique_rl.prompts": "prompts"}
    # the packaged prompts, and the constraints task's own critique template
    assert cfg["package-data"] == {"critique_rl.prompts": ["*.j2"], "critique_rl.tasks": ["constraints_prompts/*.j2"]}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A real (non-editable) wheel built from a copy of the source tree (no build/ left in the checkout)."""
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("critique_rl", "prompts"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (whl,) = out.glob("critique_rl-*.whl")
    return whl


def test_wheel_carries_the_templates_and_the_installed_loader_finds_them(wheel, tmp_path):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.rsplit("/", 1)[1] for n in names if n.startswith("critique_rl/prompts/")} == EXPECTED
    assert not any(n.startswith("prompts/") for n in names)  # package data, not a stray top-level folder
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import critique_rl, critique_rl.templates as t; print(critique_rl.__file__); print(t.PACKAGED_PROMPTS);"
            "print(t.render('refine.j2', question='1+1=', response='3', critique='no'))")
    env = {**os.environ, "PYTHONPATH": str(site)}  # the unpacked wheel comes before the editable checkout
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    module_file, prompts_dir, *rendered = proc.stdout.splitlines()
    assert Path(module_file).is_relative_to(site) and Path(prompts_dir) == (site / "critique_rl" / "prompts").resolve()
    assert "1+1=" in "\n".join(rendered)
    assert Path(critique_rl.__file__).is_relative_to(ROOT)  # this process still runs the checkout
