#!/usr/bin/env bash
# The paper's pipeline on a real pretrained LM (README "A real pretrained LM"): SmolLM2-135M on zsRE, on a CPU.
#   1. split: the first N_TRAIN records of DATA -> train.json, the next N_VALID -> valid.json, disjoint
#      (scripts/split_records.py; split.json records the source's sha256 and every index)
#   2. FT, MEMIT, EMMET and LocFT-BF edit the valid records at each m of M
#   3. MALMEN and MEND meta-train on the train records for STEPS meta-steps of TRAIN_M edits (the budget;
#      checked on one validation group), then each checkpoint edits the valid records at each m of M
#   4. aggregate.py: summary.csv, real_lm_zsre.md (editors x m x ES/GS/LS, with "before editing") and
#      real_lm_zsre.png; readme_tables.py: the tables between <!-- table:real_lm --> markers of README
# Environment [default]: DATA [datasets/zsre/zsre_mend_train.json, scripts/download_data.py zsre]
#   N_TRAIN [600]  N_VALID [400]  MODEL [smollm2]  M ["32 64 128"]  SEEDS ["0"; "0 1 2" for the spread]
#   STEPS [100]  TRAIN_M [64]  VALID_STEPS [all validation groups]  OUT [multirun/real_lm/<date>]
#   README [README.md; empty: leave it alone]
# Extra arguments go to every main.py run, e.g. model_device=cuda or launcher=joblib; a key that only some
# editors have needs Hydra's ++ (add or override), e.g. ++editor.n_steps=10 for MEMIT/EMMET.
set -uo pipefail; cd "$(dirname "$0")/.."; dir=${OUT:-multirun/real_lm/$(date +%Y-%m-%d_%H-%M-%S)}; status=0
sweep() { echo $1 | tr ' ' ','; }  # "32 64 128" -> 32,64,128
python scripts/split_records.py "${DATA:-datasets/zsre/zsre_mend_train.json}" "$dir/split" \
  --n-train "${N_TRAIN:-600}" --n-valid "${N_VALID:-400}" || exit $?
run=(experiment=real_lm_zsre model="${MODEL:-smollm2}" split_dir="$dir/split" seed="$(sweep "${SEEDS:-0}")")
edit=(data.n_edits="$(sweep "${M:-32 64 128}")" max_valid_steps="${VALID_STEPS:-null}")
# three sweeps, three folders: each keeps its own multirun.yaml; aggregate.py reads results/
python main.py -m "${run[@]}" "${edit[@]}" editor=ft,memit,emmet,locft_bf hydra.sweep.dir="$dir/results/located" "$@" || status=$?
python main.py -m "${run[@]}" editor=malmen,mend data.n_edits="${TRAIN_M:-64}" max_train_steps="${STEPS:-100}" \
  max_valid_steps=1 hydra.sweep.dir="$dir/train" 'hydra.sweep.subdir=${editor.name}_s${seed}' "$@" || status=$?
python main.py -m "${run[@]}" "${edit[@]}" editor=malmen,mend n_epochs=0 \
  "editor.checkpoint=$dir/train/\${editor.name}_s\${seed}/checkpoint.pt" hydra.sweep.dir="$dir/results/trained" "$@" || status=$?
python scripts/aggregate.py "$dir/results" || exit $?
if [ -n "${README-README.md}" ]; then
  python scripts/readme_tables.py table "$dir/results" --readme "${README-README.md}" --name real_lm \
    --csv "$dir/results/readme_table.csv" || exit $?
fi
exit $status
