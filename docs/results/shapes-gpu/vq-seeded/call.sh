# issues 11 and 14, one device call: configs/shapes-gpu.yaml as committed (recipe.sh, run A, evaluation at guidance
# 2, no sweep), and, as soon as its model is saved, benchmarks/state_dtype.py on it beside the evaluation: the
# bfloat16 decode state against the float32 one on a model that draws well (3 sampling seeds, the recipe's epsilon).
T0=$(date +%s)
python3 -m pip install --no-deps --no-index .wheels/*.whl -q 2>&1 | tail -2
(while [ ! -f runs/A/stage2-unified/config.json ]; do sleep 5; [ $(( $(date +%s) - T0 )) -gt 560 ] && exit; done; sleep 3
 PYTHONPATH=src timeout $(( ${CALL_LIMIT:-585} - ($(date +%s) - T0) )) python3 benchmarks/state_dtype.py \
   --model runs/A/stage2-unified --n-images 100 --n-prompts 96 --seeds 0 1 2 --guidance 2 --epsilon 0.001 \
   --out $OUT/state_dtype_shapes_gpu.json > $OUT/state_dtype_shapes_gpu.log 2>&1) &
SEED=${SEED:-0} SWEEP=0 TRAIN_LIMIT=${TRAIN_LIMIT:-505} EVAL_LIMIT=60 POLL=30 bash docs/results/shapes-gpu/recipe.sh 2>&1 | tail -30
wait; tail -12 $OUT/state_dtype_shapes_gpu.log
echo "call total: $(( $(date +%s) - T0 )) s"
