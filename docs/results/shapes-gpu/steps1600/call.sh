# issue 11: the GPU recipe (configs/shapes-gpu.yaml as in the working tree) as one command, timed, evaluated
T0=$(date +%s)
python3 -m pip install --no-deps --no-index .wheels/*.whl -q 2>&1 | tail -2
TRAIN_LIMIT=${TRAIN_LIMIT:-500} EVAL_LIMIT=45 BUDGET=575 POLL=20 bash docs/results/shapes-gpu/recipe.sh 2>&1 | tail -60
echo "call total: $(( $(date +%s) - T0 )) s"
