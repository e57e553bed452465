#!/usr/bin/env bash
# Offline scaling curve on a CPU: the default toy GPT-2 on the synthetic world, MALMEN and MEND, m = 16..512, 3 seeds.
# Extra arguments go to main.py, e.g. model_device=cuda, launcher=joblib or launcher=slurm (docs/experiments.md).
set -uo pipefail; cd "$(dirname "$0")/.."; dir=multirun/mini_sweep/$(date +%Y-%m-%d_%H-%M-%S); status=0
python main.py -m experiment=mini_sweep hydra.sweep.dir="$dir" "$@" || status=$?
python scripts/aggregate.py "$dir" && exit $status
