#!/bin/bash
# item 6 completion: critique_wrong_unshaped_indicative on constraints_plateau seeds 3, 4, from seed 0's warm-up,
# same code (f2exp worktree) and same command as seeds 0-2 (docs/evidence/learning-held-out.md)
cd /work/wt-f2
. /work/main/.venv/bin/activate
export PYTHONPATH=/work/wt-f2 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
OUT=/work/f-runs/constraints_plateau
for seed in 3 4; do
  uptime
  nice -n 10 python benchmarks/learning_evidence.py --task constraints_plateau --sft-task constraints --seeds $seed \
    --arms grpo critique_wrong_unshaped critique_wrong_unshaped_indicative --max-steps 100 --eval-every 50 --eval-n 156 --jobs 1 \
    --set sft_mistake_rate=1.0 sft_learning_rate=5e-4 sft_steps=1500 generation_batch_size=96 mini_batch_size=48 \
          critic.template_dir=/work/wt-f2/critique_rl/tasks/constraints_prompts \
    --out $OUT
  uptime
done
