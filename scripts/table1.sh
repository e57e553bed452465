#!/usr/bin/env bash
# Table 1: ablations at m = 512 on BERT-base / FEVER and GPT-2 / zsRE. Needs BERT_CHECKPOINT (A.4).
# Extra arguments go to main.py, e.g. model_device=cuda, launcher=joblib or launcher=slurm (docs/experiments.md).
set -uo pipefail; cd "$(dirname "$0")/.."; dir=multirun/table1/$(date +%Y-%m-%d_%H-%M-%S); status=0
python main.py -m experiment=table1_bert_fever model.checkpoint="${BERT_CHECKPOINT:?set BERT_CHECKPOINT (scripts/finetune_fever.py)}" hydra.sweep.dir="$dir/bert_fever" "$@" || status=$?
python main.py -m experiment=table1_gpt2_zsre hydra.sweep.dir="$dir/gpt2_zsre" "$@" || status=$?
python scripts/aggregate.py "$dir" && exit $status
