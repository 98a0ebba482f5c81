#!/usr/bin/env bash
# issue 11: configs/shapes-gpu.yaml with twice the stage-2 steps (STEPS, 2,400: the curves of ../relation-share still
# climb at 1,200, T2I 4 / 27 / 58 / 71 % on validation at steps 300 / 600 / 900 / 1,200, and the issue allows 20
# minutes of training against the recipe's 8) and data.shapes.relation_share SHARE (0.5: 1.0 traded the two-object
# prompts for the position ones). Longer than one device call, so the same call repeats on the warm machine:
#   - while runs/A/stage2-unified is not saved: ../recipe.sh trains run A, resuming from its newest checkpoint (one
#     every 200 steps; TRAIN_LIMIT cuts the call's share), and evaluates the model at guidance 2 (runs/A/evaluation,
#     100 images, 200 prompts) if it was saved in time;
#   - once it is: the evaluation again with the recipe's epsilon floor (runs/A/evaluation_eps) and, beside it, a
#     guidance sweep on validation with that floor (runs/A/guidance.json); $OUT/runs2.tgz.
T0=$(date +%s)
python3 -m pip install --no-deps --no-index .wheels/*.whl -q 2>&1 | tail -2
export PYTHONPATH=src; M=runs/A/stage2-unified
if [ ! -f $M/config.json ]; then
  RESUME=1 SEED=${SEED:-0} SWEEP=0 TRAIN_LIMIT=${TRAIN_LIMIT:-520} EVAL_LIMIT=${EVAL_LIMIT:-60} POLL=60 \
    RECIPE_SET="--set data.shapes.relation_share=${SHARE:-0.5} --set stages.2.steps=${STEPS:-2400} --set run.ckpt_every=200 --set run.eval_every=400" \
    bash docs/results/shapes-gpu/recipe.sh 2>&1 | tail -25
  [ -f runs/A.eval.log ] && grep -vE "it/s|s/it" runs/A.eval.log | tail -14
  ls runs/A/checkpoints 2>/dev/null | tail -2
else
  timeout 150 python3 -m omnimamba.cli guidance --model $M --n-prompts 96 --seeds 2 --scales 1 2 3 5 --epsilons 0.001 \
    --out runs/A/guidance.json > runs/A.guidance.log 2>&1 &
  timeout 100 python3 -m omnimamba.cli evaluate --model $M --out runs/A/evaluation_eps --n-images 100 --n-prompts 200 \
    --guidance 2 --epsilon 0.001 > runs/A.eval_eps.log 2>&1
  grep -vE "it/s|s/it" runs/A.eval_eps.log | tail -14
  wait; tail -6 runs/A.guidance.log
  tar czf $OUT/runs2.tgz --exclude="*.safetensors" --exclude="*.pt" --exclude=checkpoints runs/A runs/A.*log runs/A.log
fi
echo "call total: $(( $(date +%s) - T0 )) s"
