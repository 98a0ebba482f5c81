#!/usr/bin/env bash
# issue 11: configs/shapes-gpu.yaml as committed (about 14 minutes of training on one H100, so longer than one
# device call), training seed SEED, over calls on one warm machine; repeat the same call until it evaluates:
#   - while runs/A/stage2-unified is not saved: ../../docs/results/shapes-gpu/recipe.sh trains run A, resuming from
#     its newest checkpoint (TRAIN_LIMIT s of this call), and evaluates the model at guidance 2 (runs/A/evaluation)
#     once it is saved in time; RECIPE_SET: more --set overrides;
#   - once it is: the evaluation with the recipe's epsilon floor (runs/A/evaluation_eps) beside a guidance sweep
#     over scales 1 2 3 5 and floors 0.001 0.01 0.03 on validation (runs/A/guidance.json), $OUT/runs.tgz, and the
#     model itself in parts small enough to come back from the device ($OUT/model.tgz.part-*; join them with
#     `cat model.tgz.part-* | tar xz`), so it can be studied on a CPU.
# SMOKE=1: a CPU rehearsal on the tiny preset (recipe.sh's).
T0=$(date +%s)
python3 -m pip install --no-deps --no-index .wheels/*.whl -q 2>&1 | tail -2
export PYTHONPATH=src; M=runs/A/stage2-unified
if [ ! -f $M/config.json ]; then
  RESUME=1 SEED=${SEED:-0} SWEEP=0 TRAIN_LIMIT=${TRAIN_LIMIT:-520} EVAL_LIMIT=${EVAL_LIMIT:-60} POLL=60 \
    RECIPE_SET="${RECIPE_SET:-}" bash docs/results/shapes-gpu/recipe.sh 2>&1 | tail -25
  [ -f runs/A.eval.log ] && grep -vE "it/s|s/it" runs/A.eval.log | tail -14
  ls runs/A/checkpoints 2>/dev/null | tail -2
else
  small_sweep=(); small_eval=()  # SMOKE: a few prompts on the CPU (the last of a repeated option wins)
  [ -n "${SMOKE:-}" ] && small_sweep=(--device cpu --n-prompts 2 --seeds 1) small_eval=(--device cpu --n-images 2 --n-prompts 2)
  timeout 200 python3 -m omnimamba.cli guidance --model $M --n-prompts 96 --seeds 2 --scales 1 2 3 5 \
    --epsilons 0.001 0.01 0.03 --out runs/A/guidance.json "${small_sweep[@]}" > runs/A.guidance.log 2>&1 &
  timeout 100 python3 -m omnimamba.cli evaluate --model $M --out runs/A/evaluation_eps --n-images 100 --n-prompts 200 \
    --guidance 2 --epsilon 0.001 "${small_eval[@]}" > runs/A.eval_eps.log 2>&1
  grep -vE "it/s|s/it" runs/A.eval_eps.log | tail -14
  wait; grep -E "^(val|guidance|epsilon)" runs/A.guidance.log | tail -14
  tar czf $OUT/runs.tgz --exclude="*.safetensors" --exclude="*.pt" --exclude=checkpoints runs/A runs/A.*log runs/A.log
  tar czf - $M | split -b 15M - $OUT/model.tgz.part-
fi
ls -la $OUT
echo "call total: $(( $(date +%s) - T0 )) s"
