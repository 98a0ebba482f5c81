# issue 11: the GPU recipe (configs/shapes-gpu.yaml as in the working tree) as one command, timed, evaluated;
# SEED picks the training seed (run.seed)
T0=$(date +%s)
python3 -m pip install --no-deps --no-index .wheels/*.whl -q 2>&1 | tail -2
SEED=${SEED:-0} TRAIN_LIMIT=${TRAIN_LIMIT:-505} EVAL_LIMIT=50 BUDGET=585 POLL=20 bash docs/results/shapes-gpu/recipe.sh 2>&1 | tail -40
echo "call total: $(( $(date +%s) - T0 )) s"
