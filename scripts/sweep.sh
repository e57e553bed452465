#!/usr/bin/env bash
# One paper result: the multirun grid of its experiment config (config/experiment/NAME.yaml), then aggregate.py.
#   scripts/sweep.sh NAME [main.py overrides ...]     e.g. scripts/sweep.sh fig5_gpt2_zsre model_device=cuda
# NAME: an experiment (fig4_bert_fever, fig5_gpt2_zsre, ..., table1_gpt2_zsre, table2_gptj, mini_sweep, toy_table),
# or one of the results that are more than one grid:
#   table1       Table 1: table1_bert_fever and table1_gpt2_zsre, one folder each
#   toy_table    MALMEN's ablations, then MEND beside them (a second grid: MEND has no ablations)
#   fig9_memory  Fig. 9: scripts/memory_benchmark.py at m = 32 .. 8192; its own arguments, e.g. --device cuda
# Overrides go to main.py, e.g. model_device=cuda, a shorter grid data.n_edits=64,128, launcher=joblib or
# launcher=slurm (docs/experiments.md). BERT on FEVER (fig4_bert_fever, table1_bert_fever, table1) needs the
# classifier fine-tuned first (scripts/finetune_fever.py, A.4): BERT_CHECKPOINT=C, or model.checkpoint=C.
# OUT [multirun/NAME/<date>]: rerun with the same OUT, the grid keeps its finished runs and resumes the
# interrupted ones (main.py).
set -uo pipefail; cd "$(dirname "$0")/.."
usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }  # the header above
case ${1:-} in
  -h|--help) usage; exit 0;;
  ""|-*) usage >&2; echo "error: give the result's NAME first" >&2; exit 2;;
esac
name=$1
if [[ ! " table1 fig9_memory " == *" $name "* && ! -f config/experiment/$name.yaml ]]; then
  echo "error: no result $name: choose table1, fig9_memory or one of $(ls config/experiment | sed 's/\.yaml$//' | tr '\n' ' ')" >&2
  exit 2
fi
shift; dir=${OUT:-multirun/$name/$(date +%Y-%m-%d_%H-%M-%S)}; status=0
sweep() { python main.py -m "$@" || status=$?; }
bert=(); [ -z "${BERT_CHECKPOINT:-}" ] || bert=(model.checkpoint="$BERT_CHECKPOINT")
no_classifier() { echo "error: $name needs the FEVER classifier: BERT_CHECKPOINT=C$1 (scripts/finetune_fever.py)" >&2
                  exit 2; }
case $name in
  fig9_memory)
    exec python scripts/memory_benchmark.py --model gpt2 --m 32 64 128 256 512 1024 2048 4096 8192 --out "$dir" "$@";;
  table1)
    [ -n "${BERT_CHECKPOINT:-}" ] || no_classifier ""
    sweep experiment=table1_bert_fever "${bert[@]}" hydra.sweep.dir="$dir/bert_fever" "$@"
    sweep experiment=table1_gpt2_zsre hydra.sweep.dir="$dir/gpt2_zsre" "$@";;
  toy_table)
    sweep experiment=toy_table hydra.sweep.dir="$dir/malmen" "$@"
    sweep experiment=toy_table editor=mend ablation=none hydra.sweep.dir="$dir/mend" "$@";;
  fig4_bert_fever|table1_bert_fever)
    [[ -n "${BERT_CHECKPOINT:-}" || " $* " == *" model.checkpoint="* ]] || no_classifier " or model.checkpoint=C"
    sweep experiment="$name" "${bert[@]}" hydra.sweep.dir="$dir" "$@";;
  *)
    sweep experiment="$name" hydra.sweep.dir="$dir" "$@";;
esac
python scripts/aggregate.py "$dir" && exit $status
