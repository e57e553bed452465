#!/usr/bin/env bash
# Fig. 8: mean residual of MALMEN and of summed shifts against m, GPT-2 / zsRE.
# Extra arguments go to main.py, e.g. model_device=cuda, launcher=joblib or launcher=slurm (docs/experiments.md).
set -uo pipefail; cd "$(dirname "$0")/.."; dir=multirun/fig8_residual/$(date +%Y-%m-%d_%H-%M-%S); status=0
python main.py -m experiment=fig8_residual hydra.sweep.dir="$dir" "$@" || status=$?
python scripts/aggregate.py "$dir" && exit $status
