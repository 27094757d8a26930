"""Lexical memory retrieval (BM25 through ``bm25s``) never imports JAX, even when JAX is installed.

On GPU images JAX is often installed; ``bm25s.selection`` imports ``jax.lax`` and runs one ``top_k`` at import
time, which makes JAX preallocate 75% of the GPU. Each test runs a fresh interpreter with a fake ``jax``
package on ``PYTHONPATH`` that writes a marker file when it is imported and another when an op runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FAKE_JAX_INIT = """
import os
from pathlib import Path
Path(os.environ["FAKE_JAX_MARKER"]).write_text("imported")
from . import lax
"""

FAKE_JAX_LAX = """
import os
from pathlib import Path
import numpy as np

def top_k(x, k):
    Path(os.environ["FAKE_JAX_MARKER"] + ".used").write_text("top_k")
    x = np.asarray(x)
    idx = np.argsort(-x)[:k]
    return x[idx], idx
"""

SCRIPT = """
import json, sys
from pathlib import Path

mode = sys.argv[2]
if mode == "user_imported_jax_first":
    import jax  # the user's own code already uses jax
    before = sys.modules["jax"]

from critique_rl.config import MemoryConfig
from critique_rl.memory import MemoryBank

with MemoryBank(Path(sys.argv[1]), MemoryConfig(embeddings="lexical")) as bank:
    assert bank.backend == "lexical"
    bank.record(task="12+13=", trajectory="25", reward=1.0, tags=["addition"])
    bank.record(task="rev:abc=", trajectory="cba", reward=1.0, tags=["reverse"])
    bank.record(task="47+38=", trajectory="75", reward=0.0, task_name="addition", episode_id="e1")
    bank.record(task="rev:hello=", trajectory="olleh", reward=1.0, tags=["reverse"])
    hits = bank.search("reverse rev:abc", k=2, kind="demonstration")
    context = bank.context_for("33+44=", k_demos=1, k_lessons=1)

out = {
    "top_question": hits[0][0].question if hits else None,
    "top_score": hits[0][1] if hits else None,
    "context": context,
    "jax_in_modules": "jax" in sys.modules,
    "bm25s_in_modules": "bm25s" in sys.modules,
}
if mode == "user_imported_jax_first":
    out["same_jax"] = sys.modules.get("jax") is before
print("RESULT " + json.dumps(out))
if mode == "user_imports_jax_after":
    import jax  # the guard must not leave jax unimportable for the user
    print("JAX_IMPORTABLE", jax.lax.top_k([3, 1, 2], 1)[1][0] == 0)
"""


def _run(tmp_path: Path, mode: str) -> tuple[dict, subprocess.CompletedProcess, Path]:
    fake = tmp_path / "fake_site"
    (fake / "jax").mkdir(parents=True)
    (fake / "jax" / "__init__.py").write_text(FAKE_JAX_INIT)
    (fake / "jax" / "lax.py").write_text(FAKE_JAX_LAX)
    marker = tmp_path / "jax_was_imported"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(fake), str(REPO), env.get("PYTHONPATH", "")] if p)
    env["FAKE_JAX_MARKER"] = str(marker)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "bank.sqlite"), mode], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]), proc, marker


def _check_retrieval(res: dict) -> None:
    assert res["bm25s_in_modules"]  # the BM25 path really ran
    assert res["top_question"] == "rev:abc="
    assert res["top_score"] > 0
    assert res["context"]


def test_fake_jax_is_importable(tmp_path: Path) -> None:
    """Sanity check of the harness: the fake jax really is 'installed' and leaves its marker."""
    _, proc, marker = _run(tmp_path, "user_imports_jax_after")
    assert "JAX_IMPORTABLE True" in proc.stdout
    assert marker.exists()


def test_lexical_retrieval_never_imports_installed_jax(tmp_path: Path) -> None:
    res, _, marker = _run(tmp_path, "plain")
    _check_retrieval(res)
    assert res["jax_in_modules"] is False
    assert not marker.exists(), "jax was imported during memory retrieval"
    assert not Path(f"{marker}.used").exists()


def test_jax_stays_importable_for_the_user(tmp_path: Path) -> None:
    res, proc, marker = _run(tmp_path, "user_imports_jax_after")
    _check_retrieval(res)
    assert res["jax_in_modules"] is False  # not imported by retrieval ...
    assert "JAX_IMPORTABLE True" in proc.stdout and marker.exists()  # ... but the user can import it


def test_bm25s_does_not_use_jax_the_user_already_imported(tmp_path: Path) -> None:
    res, _, marker = _run(tmp_path, "user_imported_jax_first")
    _check_retrieval(res)
    assert marker.exists() and res["same_jax"] is True  # the user's module is untouched
    assert not Path(f"{marker}.used").exists(), "bm25s ran a jax op (this initialises the GPU backend)"
