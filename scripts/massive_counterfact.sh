#!/usr/bin/env bash
# Massive editing on a real LM (docs/experiments.md): SmolLM2-135M on CounterFact, every editor up to m = 1024, on a CPU.
#   1. split: DATA -> N_TRAIN meta-training and N_VALID validation records with no subject in both
#      (scripts/split_records.py --by-subject; split.json records the source's sha256 and every index)
#   2. one cell per (m, editor, seed), each its own run directory OUT/results/<editor>_m<m>_s<seed>:
#      MALMEN, MEND and FT at every m of M; MEMIT, EMMET and LocFT-BF at every m of LOCATED_M (default: M).
#      MALMEN and MEND meta-train anew at each m for STEPS meta-steps (the same budget at every m), then
#      validate at that m; the others edit the validation records directly. VALID_STEPS groups per seed.
#   3. aggregate.py: OUT/results/summary.csv, massive_counterfact.md (a row per m and editor: ES/GS/LS,
#      efficacy/paraphrase/neighborhood, wall and CPU time) and massive_counterfact.png (against m, log axis);
#      readme_tables.py: the same in one table (std over validation groups), with each row's command, between
#      <!-- table:massive_counterfact --> markers of $README (only when README=PATH is given) and in OUT/results/readme_table.csv
# Resumable: rerun the same command with the same OUT. A cell with results.json is kept; a MALMEN/MEND cell
# with a checkpoint.pt continues its meta-training from it (editor.resume=true); any other cell starts again.
# The split is made once (OUT/split/split.json kept). A MEMIT/EMMET cell restarts, but the target vectors its
# interrupted run finished are read back from cache_dir (editor.cache_targets: cached per request).
# Environment [default]: DATA [datasets/raw/counterfact.json: scripts/download_data.py counterfact puts ROME's file
#   there; or the flat counterfact-train.json of MEND/EasyEdit]  N_TRAIN [8000]  N_VALID [2000]  M ["128 256 512 1024"]
#   LOCATED_M [M]  EDITORS ["malmen mend ft memit emmet locft_bf"]  SEEDS ["0"]  STEPS [20]
#   VALID_STEPS [3]  OUT [multirun/massive_counterfact/<date>]  README [unset: no README is touched; README=README.md writes its table block]
# Extra arguments go to every main.py run, e.g. model_device=cuda.
set -uo pipefail; cd "$(dirname "$0")/.."; dir=${OUT:-multirun/massive_counterfact/$(date +%Y-%m-%d_%H-%M-%S)}
status=0
if [ ! -f "$dir/split/split.json" ]; then
  python scripts/split_records.py "${DATA:-datasets/raw/counterfact.json}" "$dir/split" --format counterfact \
    --by-subject --seed 0 --n-train "${N_TRAIN:-8000}" --n-valid "${N_VALID:-2000}" || exit $?
fi
editors=" ${EDITORS:-malmen mend ft memit emmet locft_bf} "
for m in ${M:-128 256 512 1024}; do
  for editor in malmen mend ft memit emmet locft_bf; do
    [[ $editors == *" $editor "* ]] || continue
    case $editor in memit|emmet|locft_bf) [[ " ${LOCATED_M:-${M:-128 256 512 1024}} " == *" $m "* ]] || continue;; esac
    for seed in ${SEEDS:-0}; do
      cell="$dir/results/${editor}_m${m}_s${seed}"
      if [ -f "$cell/results.json" ]; then echo "kept: $cell"; continue; fi
      resume=()
      if [ -f "$cell/checkpoint.pt" ]; then resume=(editor.resume=true); echo "resuming: $cell"; fi
      echo "running: $cell"
      python main.py experiment=massive_counterfact editor="$editor" data.n_edits="$m" seed="$seed" \
        split_dir="$dir/split" max_train_steps="${STEPS:-20}" max_valid_steps="${VALID_STEPS:-3}" \
        hydra.run.dir="$cell" "${resume[@]}" "$@" || status=$?
    done
  done
done
python scripts/aggregate.py "$dir/results" || exit $?
if [ -n "${README:-}" ]; then
  python scripts/readme_tables.py table "$dir/results" --readme "$README" --name massive_counterfact --combined \
    --times --spread groups --csv "$dir/results/readme_table.csv" --made-by "OUT=DIR scripts/massive_counterfact.sh" || exit $?
fi
exit $status
