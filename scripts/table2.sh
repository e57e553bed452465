#!/usr/bin/env bash
# Table 2: GPT-J / zsRE at m = 8192, MALMEN vs cache all tokens (GPU: pass model_device=cuda).
# Extra arguments go to main.py, e.g. model_device=cuda, launcher=joblib or launcher=slurm (docs/experiments.md).
set -uo pipefail; cd "$(dirname "$0")/.."; dir=multirun/table2/$(date +%Y-%m-%d_%H-%M-%S); status=0
python main.py -m experiment=table2_gptj hydra.sweep.dir="$dir" "$@" || status=$?
python scripts/aggregate.py "$dir" && exit $status
