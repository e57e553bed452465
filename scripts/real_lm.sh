#!/usr/bin/env bash
# The paper's pipeline on a real pretrained LM (docs/experiments.md, "A real pretrained LM"): SmolLM2-135M on zsRE, on a CPU.
#   1. split (once): the first N_TRAIN records of DATA -> train.json, the next N_VALID -> valid.json, disjoint
#      (scripts/split_records.py; split.json records the source's sha256 and every index)
#   2. the grid of config/experiment/real_lm_zsre.yaml at each m of M, each cell its own run directory
#      OUT/results/<model>_zsre_<editor>_none_m<m>_s<seed>: FT, MEMIT, EMMET and LocFT-BF edit the valid records;
#      MALMEN and MEND, as the paper, one hyper-network per m: each meta-trains on the train records at m edits
#      per step for STEPS meta-steps (the same budget at every m), then edits the valid records at that m
#   3. aggregate.py: summary.csv, real_lm_zsre.md (editors x m x ES/GS/LS, with "before editing") and
#      real_lm_zsre.png; with README=PATH, readme_tables.py: the table as data in RESULTS/real_lm/, rendered
#      between the <!-- table:real_lm --> markers of PATH
# Resumable: rerun the same command with the same OUT (main.py keeps a cell with results.json of its config and
# continues a MALMEN/MEND cell's meta-training from its checkpoint.pt).
# Environment [default]: DATA [datasets/zsre/zsre_mend_train.json, scripts/download_data.py zsre]
#   N_TRAIN [600]  N_VALID [400]  MODEL [smollm2]  M ["32 64 128"]  SEEDS ["0"; "0 1 2" for the spread]
#   STEPS [100, experiment real_lm_zsre]  VALID_STEPS [all validation groups]  OUT [multirun/real_lm/<date>]
#   README [unset: no README or results/ is touched]  RESULTS [results]  EDITORS ["ft memit emmet locft_bf malmen mend"]
# The budget is meta-steps, not edits: Adam moves each parameter (eta among them) by about meta_lr per step, so
# the step count, not the edits seen, sets how far the hyper-network gets; every m cycles the same train records.
# Extra arguments go to every main.py run, e.g. model_device=cuda or launcher=joblib; a key that only some
# editors have needs Hydra's ++ (add or override), e.g. ++editor.n_steps=10 for MEMIT/EMMET.
set -uo pipefail; cd "$(dirname "$0")/.."; dir=${OUT:-multirun/real_lm/$(date +%Y-%m-%d_%H-%M-%S)}; status=0
list() { echo $* | tr ' ' ','; }  # "32 64 128" -> 32,64,128
if [ ! -f "$dir/split/split.json" ]; then
  python scripts/split_records.py "${DATA:-datasets/zsre/zsre_mend_train.json}" "$dir/split" \
    --n-train "${N_TRAIN:-600}" --n-valid "${N_VALID:-400}" || exit $?
fi
python main.py -m experiment=real_lm_zsre model="${MODEL:-smollm2}" split_dir="$dir/split" seed="$(list ${SEEDS:-0})" \
  data.n_edits="$(list ${M:-32 64 128})" editor="$(list ${EDITORS:-ft memit emmet locft_bf malmen mend})" \
  max_valid_steps="${VALID_STEPS:-null}" ${STEPS:+max_train_steps=$STEPS} hydra.sweep.dir="$dir/results" "$@" \
  || status=$?
python scripts/aggregate.py "$dir/results" || exit $?
if [ -n "${README:-}" ]; then  # the table as data in RESULTS/real_lm/, then the README's block from it
  python scripts/readme_tables.py table "$dir/results" --save real_lm --results "${RESULTS:-results}" --readme "$README" \
    --made-by "OUT=DIR scripts/real_lm.sh" || exit $?
fi
exit $status
