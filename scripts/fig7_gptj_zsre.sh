#!/usr/bin/env bash
# Fig. 7: GPT-J / zsRE scaling curve (GPU: pass model_device=cuda).
# Extra arguments go to main.py, e.g. model_device=cuda, launcher=joblib or launcher=slurm (docs/experiments.md).
set -uo pipefail; cd "$(dirname "$0")/.."; dir=multirun/fig7_gptj_zsre/$(date +%Y-%m-%d_%H-%M-%S); status=0
python main.py -m experiment=fig7_gptj_zsre hydra.sweep.dir="$dir" "$@" || status=$?
python scripts/aggregate.py "$dir" && exit $status
