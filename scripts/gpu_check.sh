#!/usr/bin/env bash
# One-command GPU check: the first thing to run whenever a GPU is available (<= 8 minutes on one H100).
#
#   bash scripts/download_gpu_wheels.sh          # once, on a machine with network: wheels into gpu_wheels/
#   bash scripts/gpu_check.sh [--out DIR]        # on the GPU machine (no network needed)
#   bash scripts/gpu_check.sh --dry-run          # CPU: the same sections at toy sizes (what the tests run)
#   bash scripts/gpu_check.sh --install-only     # install the carried wheel part(s) and stop (64 MiB per call:
#                                                # gpu_wheels/part1 in one call, the check with part2 in the next)
#
# Expects a CUDA image with torch, transformers, accelerate and peft; installs the carried wheels from
# gpu_wheels/ (trl, datasets, openai, pydantic, typer, ... with --no-index --no-deps, skipping any package the
# image already has), then runs, each under its own time limit:
#   env        torch / CUDA / GPU versions
#   tests      the CUDA-relevant tests (precision, fused LM head and log-probs, prefix sharing, memory estimate,
#              tests/test_cuda_paths.py)
#   vs_trl     benchmarks/vs_trl.py --preset gpu-0.5b, one round: samples/s >= 1.5x TRL, peak memory <= TRL
#   step_2048  our update at 2,048 new tokens (gradient checkpointing), estimate within 15% of the measured peak
#   lora_gc    LoRA + gradient checkpointing at 512 tokens, estimate within 15%
#   step_256   the gpu-0.5b update as benchmarked (no checkpointing), estimate within 15%
# Writes DIR/gpu_check.json (every section's numbers) and prints one PASS/FAIL line per check.
set -u
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT=gpu_check_out
DRY=0
INSTALL_ONLY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --install-only) INSTALL_ONLY=1 ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (use --dry-run, --install-only, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
PY=${PYTHON:-python}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
WHEELS="${GPU_WHEELS:-$REPO/gpu_wheels}"
START=$(date +%s)
log() { echo "[gpu_check $(( $(date +%s) - START ))s] $*"; }

# ---- wheels (no network on the GPU side) -------------------------------------------------------------
if [ -d "$WHEELS" ] && [ -n "$(find "$WHEELS" -maxdepth 2 -name '*.whl' -print -quit)" ]; then
  log "installing carried wheels from gpu_wheels/ and gpu_wheels/part*/ (missing packages only)"
  "$PY" - "$WHEELS" > "$OUT/wheels_to_install.txt" <<'PYEOF'
import importlib.metadata as md, pathlib, re, sys
root = pathlib.Path(sys.argv[1])
for w in sorted([*root.glob("*.whl"), *root.glob("part*/*.whl")]):
    name = re.split(r"-\d", w.name, maxsplit=1)[0]
    try:
        md.version(name)
    except md.PackageNotFoundError:
        print(w)
PYEOF
  if [ -s "$OUT/wheels_to_install.txt" ]; then
    "$PY" -m pip install -q --no-index --no-deps $(cat "$OUT/wheels_to_install.txt") > "$OUT/pip_install.log" 2>&1 \
      || log "pip install of the carried wheels failed (see $OUT/pip_install.log)"
  fi
elif [ "$DRY" = 0 ]; then
  log "no gpu_wheels/ folder: trl/datasets/openai must already be installed (bash scripts/download_gpu_wheels.sh)"
fi
if [ "$INSTALL_ONLY" = 1 ]; then
  n=0; [ -f "$OUT/wheels_to_install.txt" ] && n=$(wc -l < "$OUT/wheels_to_install.txt")
  log "--install-only: $n wheel(s) to install this call; stopping before the checks"
  exit 0
fi

run() {  # run NAME TIMEOUT_S CMD...: stdout+stderr to $OUT/NAME.log, exit code to $OUT/NAME.rc
  local name=$1 limit=$2; shift 2
  log "$name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo $? > "$OUT/$name.rc"
}

if [ "$DRY" = 1 ]; then
  DEV=cpu
  TINY="$OUT/tiny_config"
  "$PY" -c "
from transformers import LlamaConfig
LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=256).save_pretrained('$TINY')"
  STEP=(--device cpu --config-dir "$TINY" --prompts 4 --generations 4 --micro-batch 8)
  T_LONG=32; T_LORA=16; T_BASE=8
  TESTS=(tests/test_gpu_memory_estimate.py -k "tracker or kv_cache")
else
  DEV=cuda
  STEP=(--device cuda)
  T_LONG=2048; T_LORA=512; T_BASE=256
  TESTS=(tests/test_precision.py tests/test_cuda_paths.py tests/test_gpu_memory_estimate.py)
  for f in tests/test_prefix_sharing.py tests/test_fused_head.py tests/test_logprobs.py; do
    [ -f "$f" ] && TESTS+=("$f")
  done
fi

run env 60 "$PY" -c "
import json, torch, transformers, accelerate
info = {'torch': torch.__version__, 'cuda': torch.version.cuda, 'transformers': transformers.__version__,
        'accelerate': accelerate.__version__, 'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        'gpu_memory_gb': torch.cuda.get_device_properties(0).total_memory / 1e9 if torch.cuda.is_available() else None}
for mod in ('peft', 'trl', 'datasets', 'openai', 'pydantic'):
    try:
        info[mod] = __import__(mod).__version__
    except Exception as e:
        info[mod] = None
print(json.dumps(info))"
if [ "$DRY" = 0 ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { log "no CUDA device visible: use --dry-run on a CPU machine"; }
fi

run tests 150 "$PY" -m pytest -q -x -p no:cacheprovider -o addopts="" -m "not slow and not vllm" "${TESTS[@]}"
if [ "$DRY" = 0 ]; then
  run vs_trl 270 "$PY" benchmarks/vs_trl.py --preset gpu-0.5b --rounds 1 --steps 3 --warmup 1 --results-dir "$OUT"
fi
run step_long 120 "$PY" scripts/gpu_step_check.py "${STEP[@]}" --tokens "$T_LONG" --gc --name step_${T_LONG}_gc \
  --out "$OUT/step_long.json"
run lora_gc 90 "$PY" scripts/gpu_step_check.py "${STEP[@]}" --tokens "$T_LORA" --gc --lora --name lora_gc_${T_LORA} \
  --out "$OUT/lora_gc.json"
run step_base 90 "$PY" scripts/gpu_step_check.py "${STEP[@]}" --tokens "$T_BASE" --name step_${T_BASE} \
  --out "$OUT/step_base.json"

"$PY" - "$OUT" "$DRY" "$(( $(date +%s) - START ))" <<'PYEOF'
import json, pathlib, re, sys
out, dry, wall = pathlib.Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
def rc(name):
    p = out / f"{name}.rc"
    return int(p.read_text().strip()) if p.is_file() else None
def tail(name, n=5):
    p = out / f"{name}.log"
    return p.read_text(errors="replace").strip().splitlines()[-n:] if p.is_file() else []
checks, record = [], {"dry_run": dry, "wall_s": wall}
env = tail("env", 1)
try:
    record["env"] = json.loads(env[-1])
except (IndexError, json.JSONDecodeError):
    record["env"] = {"error": env}
t = rc("tests")
summary = next((l for l in reversed(tail("tests", 30)) if re.search(r"\d+ (passed|failed)", l)), "")
checks.append(("tests", t == 0, summary or f"exit {t}"))
record["tests"] = {"rc": t, "summary": summary}
if not dry:
    v = out / "vs_trl_gpu-0.5b.json"
    if v.is_file():
        r = json.loads(v.read_text())
        ratios = r.get("ratios", {})
        record["vs_trl"] = {"ratios": ratios, "summary": r.get("summary")}
        sps, mem = ratios.get("samples_per_s"), ratios.get("memory")
        checks.append(("vs_trl_samples_per_s>=1.5x", sps is not None and sps >= 1.5, f"ratio {sps}"))
        checks.append(("vs_trl_peak_memory<=TRL", mem is not None and mem <= 1.0, f"ratio {mem}"))
    else:
        record["vs_trl"] = {"rc": rc("vs_trl"), "tail": tail("vs_trl", 15)}
        checks.append(("vs_trl", False, f"no result (exit {rc('vs_trl')}; 124 = time limit)"))
for name in ("step_long", "lora_gc", "step_base"):
    p = out / f"{name}.json"
    if p.is_file():
        r = json.loads(p.read_text())
        record[name] = r
        err = r.get("estimate_error")
        detail = (f"estimate {r['estimate_bytes'] / 1e9:.3f} GB vs measured {r['measured_bytes'] / 1e9:.3f} GB "
                  f"({err:+.1%})") if err is not None else r.get("error", "")
        checks.append((r["check"], r.get("status") == "PASS", detail))
    else:
        record[name] = {"rc": rc(name), "tail": tail(name, 15)}
        checks.append((name, False, f"no result (exit {rc(name)}; 124 = time limit)"))
record["checks"] = [{"check": c, "pass": ok, "detail": d} for c, ok, d in checks]
(out / "gpu_check.json").write_text(json.dumps(record, indent=2) + "\n")
for c, ok, d in checks:
    print(f"{'PASS' if ok else 'FAIL'} {c}: {d}")
print(f"wrote {out / 'gpu_check.json'} ({wall} s)")
sys.exit(0 if all(ok for _, ok, _ in checks) else 1)
PYEOF
