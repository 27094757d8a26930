#!/bin/bash
# amendment 3 warm-up: ./warm.sh NAME STEPS MISTAKE_RATE  (one SFT warm-up on constraints, seed 0, eval on 300 held-out)
S=/work/f-runs/snap-f719f01
cd $S
. /work/main/.venv/bin/activate
export PYTHONPATH=$S OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
NAME=$1; STEPS=$2; RATE=$3
OUT=/work/f-runs/warmups/$NAME
mkdir -p /work/f-runs/warmups
uptime
SPEC="{\"task\": \"constraints\", \"sft_task\": \"constraints\", \"max_steps\": 100, \"eval_every\": 50, \"eval_n\": 300, \"extra\": {\"sft_mistake_rate\": $RATE, \"sft_learning_rate\": 5e-4, \"sft_steps\": $STEPS, \"generation_batch_size\": 96, \"mini_batch_size\": 48, \"critic\": {\"template_dir\": \"$S/critique_rl/tasks/constraints_prompts\"}}, \"threads\": 1, \"arm_extra\": {}, \"arm\": \"sft\", \"seed\": 0, \"out\": \"$OUT\"}"
echo "$SPEC"
/usr/bin/time -v nice -n 10 python benchmarks/learning_evidence.py --worker "$SPEC" 2>&1 | grep -v "Loading weights" | tail -30
uptime
nice -n 10 python benchmarks/accuracy_by_tag.py --task constraints --n 300 $OUT/final --out /work/f-runs/warmups/$NAME.by_tag.json 2>&1 | tail -1
