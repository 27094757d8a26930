#!/usr/bin/env bash
# Download the wheels a bare CUDA image (torch, transformers, accelerate, peft) lacks for scripts/gpu_check.sh,
# into gpu_wheels/ (git-ignored), to carry to a GPU machine without network. Run where PyPI is reachable:
#
#   bash scripts/download_gpu_wheels.sh [--python-version 3.12] [--dest gpu_wheels] [--list]
#
# --list prints the pinned requirement list and exits. Wheels only (--only-binary=:all:), --no-deps: the list
# below is the closure of trl, datasets, openai, pydantic and the project's own dependencies minus what the
# image has, pinned to versions resolved together (trl 1.16.0 is the version of the recorded H100 run).
# gpu_check.sh installs them with --no-index --no-deps, skipping any package already installed.
#
# The device tool carries at most 64 MiB per call and these wheels come to ~99 MiB (pyarrow alone ~53 MiB), so
# they are split into gpu_wheels/part1, part2, ... (scripts/pack_wheels.py, <= 56 MiB each: with the ~5 MiB
# repository a call stays under 64). On the device, one
# call per part installs it (the machine stays warm between calls, installs persist), the last one runs the check:
#   call 1: carry [gpu_wheels/part1]   bash scripts/gpu_check.sh --install-only
#   call 2: carry [gpu_wheels/part2]   bash scripts/gpu_check.sh --out "$OUT/gpu_check"
set -eu
cd "$(dirname "$0")/.."
PYV=3.12
DEST=gpu_wheels
LIST=0
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) PYV="$2"; shift ;;
    --dest) DEST="$2"; shift ;;
    --list) LIST=1 ;;
    *) echo "download_gpu_wheels.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
REQS=(
  # TRL and the datasets library it imports
  trl==1.16.0 datasets==5.2.0 pyarrow==26.0.1 pandas==3.1.1 python-dateutil==4.0.0 tzdata==2026.6
  dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0
  # openai client (critics) and pydantic
  openai==3.63.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  jiter==0.19.0 distro==1.9.0 sniffio==1.3.1 anyio==4.16.0 httpx==0.29.0 httpcore==1.0.9 h11==0.16.0
  # the project's CLI, console, retrieval and plots
  typer==0.29.2 click==8.5.1 shellingham==1.5.4 annotated-doc==0.0.7 rich==15.0.0 markdown-it-py==4.3.0
  mdurl==0.1.2 Pygments==2.21.0 bm25s==0.3.16 matplotlib==3.11.2 contourpy==1.3.3 cycler==0.12.1
  fonttools==4.69.1 kiwisolver==1.5.1 pillow==13.0.0 pyparsing==3.3.3
)
if [ "$LIST" = 1 ]; then printf '%s\n' "${REQS[@]}"; exit 0; fi
mkdir -p "$DEST"
PY=${PYTHON:-python3}
"$PY" -m pip download --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any --dest "$DEST" "${REQS[@]}"
n=$(ls "$DEST"/*.whl | wc -l)
size=$(du -sm "$DEST" | cut -f1)
echo "downloaded $n wheels into $DEST ($size MiB); splitting into parts under the 64 MiB carry limit:"
"$PY" scripts/pack_wheels.py "$DEST"
echo "carry one part per device call: 'bash scripts/gpu_check.sh --install-only' for all but the last part"
