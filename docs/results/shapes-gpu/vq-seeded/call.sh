# issues 11, 13 and 14, one device call: the scan chain-rule kernel's and the scan's GPU gradient tests (the recipe
# falls back to the torch chain rule if the kernel's fail), then configs/shapes-gpu.yaml as committed (recipe.sh,
# run A, no sweep) with the evaluation at guidance 2 if the call's time allows, and, as soon as its model is saved,
# benchmarks/state_dtype.py on it: the bfloat16 decode state against the float32 one on a model that draws well.
# What does not fit runs in call2.sh on the same machine.
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
python3 -m pip install --no-deps --no-index .wheels/*.whl -q 2>&1 | tail -2
PYTHONPATH=src timeout 150 python3 -m pytest tests/test_ops_gpu.py -k "chain_kernel or scan_gradients" -q \
  -p no:cacheprovider > $OUT/gpu_tests_chain.log 2>&1 || export OMNIMAMBA_SCAN_CHAIN=torch
tail -3 $OUT/gpu_tests_chain.log; echo "tests done at $(el) s, chain rule: ${OMNIMAMBA_SCAN_CHAIN:-triton}"
(while [ ! -f runs/A/stage2-unified/config.json ]; do sleep 5; [ $(el) -gt 560 ] && exit; done; sleep 3
 PYTHONPATH=src timeout $(( ${CALL_LIMIT:-585} - $(el) )) python3 benchmarks/state_dtype.py \
   --model runs/A/stage2-unified --n-images 100 --n-prompts 96 --seeds 0 1 2 --guidance 2 --epsilon 0.001 \
   --out $OUT/state_dtype_shapes_gpu.json > $OUT/state_dtype_shapes_gpu.log 2>&1 && touch runs/A/state_dtype_done) &
SEED=${SEED:-0} SWEEP=0 TRAIN_LIMIT=$(( 575 - $(el) )) EVAL_LIMIT=60 POLL=30 OUT=$OUT \
  bash docs/results/shapes-gpu/recipe.sh 2>&1 | grep -vE "^(runs/A.log|[0-9]+ %)" | tail -12
wait; tail -6 $OUT/state_dtype_shapes_gpu.log
echo "call total: $(el) s"
