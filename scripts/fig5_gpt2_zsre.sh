#!/usr/bin/env bash
# Fig. 5: GPT-2 / zsRE scaling curve.
# Extra arguments go to main.py, e.g. model_device=cuda, launcher=joblib or launcher=slurm (docs/experiments.md).
set -uo pipefail; cd "$(dirname "$0")/.."; dir=multirun/fig5_gpt2_zsre/$(date +%Y-%m-%d_%H-%M-%S); status=0
python main.py -m experiment=fig5_gpt2_zsre hydra.sweep.dir="$dir" "$@" || status=$?
python scripts/aggregate.py "$dir" && exit $status
