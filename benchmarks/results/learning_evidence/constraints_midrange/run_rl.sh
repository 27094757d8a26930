#!/bin/bash
# amendment 3 RL runs: ./run_b.sh WARMUP STEPS RATE ; seeds 0-4 in order, arms grpo then critique_wrong_unshaped,
# every seed from the one chosen warm-up (sft_s<k> -> the warm-up folder)
S=/work/f-runs/snap-f719f01
cd $S
. /work/main/.venv/bin/activate
export PYTHONPATH=$S OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
W=/work/f-runs/warmups/$1; STEPS=$2; RATE=$3
OUT=/work/f-runs/constraints_midrange
mkdir -p $OUT
for seed in 0 1 2 3 4; do
  ln -sfn $W $OUT/sft_s$seed
  uptime
  nice -n 10 python benchmarks/learning_evidence.py --task constraints --sft-task constraints --seeds $seed \
    --arms grpo critique_wrong_unshaped --max-steps 100 --eval-every 50 --eval-n 300 --jobs 1 \
    --set sft_mistake_rate=$RATE sft_learning_rate=5e-4 sft_steps=$STEPS generation_batch_size=96 mini_batch_size=48 \
          critic.template_dir=$S/critique_rl/tasks/constraints_prompts \
    --out $OUT
  uptime
done
