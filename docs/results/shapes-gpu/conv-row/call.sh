# issue 11: the GPU recipe with the Shapes models' wide conv (d_conv 17: one row of 16 image codes and one more),
# one device call: the fla conv's GPU parity tests at widths 4 and 17 (beside the training, on the same GPU), then
# `recipe.sh` (train, evaluate at guidance 2, guidance sweep while the budget lasts). SEED picks run.seed.
T0=$(date +%s)
python3 -m pip install --no-deps --no-index .wheels/*.whl -q 2>&1 | tail -2
(PYTHONPATH=src timeout 300 python3 -m pytest tests/test_ops_gpu.py -k causal_conv -q -p no:cacheprovider \
   > $OUT/conv_tests.log 2>&1 &)
RECIPE_SET="${RECIPE_SET:---set model.overrides.backbone.d_conv=17}" SEED=${SEED:-0} TRAIN_LIMIT=${TRAIN_LIMIT:-495} \
  EVAL_LIMIT=60 BUDGET=575 POLL=30 bash docs/results/shapes-gpu/recipe.sh 2>&1 | tail -30
tail -5 $OUT/conv_tests.log
echo "call total: $(( $(date +%s) - T0 )) s"
