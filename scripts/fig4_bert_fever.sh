#!/usr/bin/env bash
# Fig. 4: BERT-base / FEVER scaling curve. Needs BERT_CHECKPOINT=<fine-tuned classifier.safetensors> (A.4).
# Extra arguments go to main.py, e.g. model_device=cuda, launcher=joblib or launcher=slurm (docs/experiments.md).
set -uo pipefail; cd "$(dirname "$0")/.."; dir=multirun/fig4_bert_fever/$(date +%Y-%m-%d_%H-%M-%S); status=0
python main.py -m experiment=fig4_bert_fever model.checkpoint="${BERT_CHECKPOINT:?set BERT_CHECKPOINT (scripts/finetune_fever.py)}" hydra.sweep.dir="$dir" "$@" || status=$?
python scripts/aggregate.py "$dir" && exit $status
