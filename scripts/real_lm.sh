#!/usr/bin/env bash
# The paper's pipeline on a real pretrained LM (README "A real pretrained LM"): SmolLM2-135M on zsRE, on a CPU.
#   1. split: the first N_TRAIN records of DATA -> train.json, the next N_VALID -> valid.json, disjoint
#      (scripts/split_records.py; split.json records the source's sha256 and every index)
#   2. FT, MEMIT, EMMET and LocFT-BF edit the valid records at each m of M
#   3. MALMEN and MEND, as the paper, one hyper-network per m: each meta-trains on the train records at m edits
#      per step for STEPS meta-steps (the same budget at every m), then edits the valid records at that m
#   4. aggregate.py: summary.csv, real_lm_zsre.md (editors x m x ES/GS/LS, with "before editing") and
#      real_lm_zsre.png; readme_tables.py: the tables between <!-- table:real_lm --> markers of $README (if set)
# Environment [default]: DATA [datasets/zsre/zsre_mend_train.json, scripts/download_data.py zsre]
#   N_TRAIN [600]  N_VALID [400]  MODEL [smollm2]  M ["32 64 128"]  SEEDS ["0"; "0 1 2" for the spread]
#   STEPS [100, experiment real_lm_zsre]  VALID_STEPS [all validation groups]  OUT [multirun/real_lm/<date>]
#   README [unset: no README is touched; README=README.md writes its table block]  EDITORS ["ft memit emmet locft_bf malmen mend"]
# The budget is meta-steps, not edits: Adam moves each parameter (eta among them) by about meta_lr per step, so
# the step count, not the edits seen, sets how far the hyper-network gets; every m cycles the same train records.
# Extra arguments go to every main.py run, e.g. model_device=cuda or launcher=joblib; a key that only some
# editors have needs Hydra's ++ (add or override), e.g. ++editor.n_steps=10 for MEMIT/EMMET.
set -uo pipefail; cd "$(dirname "$0")/.."; dir=${OUT:-multirun/real_lm/$(date +%Y-%m-%d_%H-%M-%S)}; status=0
sweep() { echo $1 | tr ' ' ','; }  # "32 64 128" -> 32,64,128
python scripts/split_records.py "${DATA:-datasets/zsre/zsre_mend_train.json}" "$dir/split" \
  --n-train "${N_TRAIN:-600}" --n-valid "${N_VALID:-400}" || exit $?
run=(experiment=real_lm_zsre model="${MODEL:-smollm2}" split_dir="$dir/split" seed="$(sweep "${SEEDS:-0}")")
edit=(data.n_edits="$(sweep "${M:-32 64 128}")" max_valid_steps="${VALID_STEPS:-null}")
editors=" ${EDITORS:-ft memit emmet locft_bf malmen mend} "
pick() { for e in "$@"; do [[ $editors == *" $e "* ]] && echo -n "$e,"; done | sed 's/,$//'; }
located=$(pick ft memit emmet locft_bf); trained=$(pick malmen mend)
# two sweeps, two folders: each keeps its own multirun.yaml; aggregate.py reads results/
if [ -n "$located" ]; then
  python main.py -m "${run[@]}" "${edit[@]}" editor="$located" hydra.sweep.dir="$dir/results/located" "$@" || status=$?
fi
if [ -n "$trained" ]; then  # each run meta-trains at its own m, then validates at that m
  python main.py -m "${run[@]}" "${edit[@]}" editor="$trained" ${STEPS:+max_train_steps=$STEPS} \
    hydra.sweep.dir="$dir/results/trained" "$@" || status=$?
fi
python scripts/aggregate.py "$dir/results" || exit $?
if [ -n "${README:-}" ]; then
  python scripts/readme_tables.py table "$dir/results" --readme "$README" --name real_lm \
    --csv "$dir/results/readme_table.csv" --made-by "OUT=DIR scripts/real_lm.sh" || exit $?
fi
exit $status
