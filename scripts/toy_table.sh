#!/usr/bin/env bash
# The default experiment side by side (README): MALMEN, "sum of shifts", "no regularisation" and MEND
# on the toy GPT-2 and the synthetic world at m = 256, then toy_table.md and summary.csv.
# Seeds 0, 1, 2. Extra arguments go to main.py, e.g. launcher=joblib (runs in parallel) or model_device=cuda.
set -uo pipefail; cd "$(dirname "$0")/.."; dir=multirun/toy_table/$(date +%Y-%m-%d_%H-%M-%S); status=0
# two sweeps, two folders: each keeps its own multirun.yaml; aggregate.py reads both
python main.py -m experiment=toy_table hydra.sweep.dir="$dir/malmen" "$@" || status=$?
python main.py -m experiment=toy_table editor=mend ablation=none hydra.sweep.dir="$dir/mend" "$@" || status=$?
python scripts/aggregate.py "$dir" && exit $status
