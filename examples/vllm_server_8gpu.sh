#!/usr/bin/env bash
# 8 GPUs: policy vLLM server on GPU 6, critic vLLM server on GPU 7, trainer (accelerate FSDP2) on GPUs 0-5.
#   POLICY=/models/Qwen2.5-1.5B-Instruct CRITIC=/models/Qwen2.5-7B-Instruct bash examples/vllm_server_8gpu.sh
# Unverified on GPUs by this project (see examples/vllm_server_8gpu.yaml for the memory each part needs).
set -euo pipefail
cd "$(dirname "$0")/.."
POLICY="${POLICY:-/models/Qwen2.5-1.5B-Instruct}"
CRITIC="${CRITIC:-/models/Qwen2.5-7B-Instruct}"
mkdir -p runs/logs

# The policy server. VLLM_SERVER_DEV_MODE=1 enables /collective_rpc (the trainer's weight push: reload_weights from
# vllm.sync_dir) and /reset_prefix_cache; bind it to 127.0.0.1 (development endpoints must not be exposed).
# processed_logprobs: log-probs under logits / temperature, what truncated importance sampling compares with.
CUDA_VISIBLE_DEVICES=6 VLLM_SERVER_DEV_MODE=1 vllm serve "$POLICY" --host 127.0.0.1 --port 8000 \
  --served-model-name policy --dtype bfloat16 --max-model-len 4096 --gpu-memory-utilization 0.9 \
  --logprobs-mode processed_logprobs --enable-prefix-caching > runs/logs/policy_server.log 2>&1 &
POLICY_PID=$!
# The critic server: a plain OpenAI-compatible server (no weight updates).
CUDA_VISIBLE_DEVICES=7 vllm serve "$CRITIC" --host 127.0.0.1 --port 8001 --served-model-name critic \
  --dtype bfloat16 --max-model-len 8192 --gpu-memory-utilization 0.9 > runs/logs/critic_server.log 2>&1 &
CRITIC_PID=$!
trap 'kill $POLICY_PID $CRITIC_PID 2>/dev/null || true' EXIT

for port in 8000 8001; do
  until curl -sf "http://127.0.0.1:$port/v1/models" > /dev/null; do sleep 5; done
done

CUDA_VISIBLE_DEVICES=0,1,2,3,4,5 accelerate launch --config_file examples/accelerate/fsdp.yaml --num_processes 6 \
  -m critique_rl.cli train examples/vllm_server_8gpu.yaml --no-progress
