#!/usr/bin/env bash
# Massive editing on a real LM (docs/experiments.md): SmolLM2-135M on CounterFact, every editor up to m = 1024, on a CPU.
#   1. split (once): DATA -> N_TRAIN meta-training and N_VALID validation records with no subject in both
#      (scripts/split_records.py --by-subject; split.json records the source's sha256 and every index)
#   2. the grid of config/experiment/massive_counterfact.yaml, one cell per (m, editor, seed), each its own run
#      directory OUT/results/<editor>_m<m>_s<seed>: MALMEN, MEND and FT at every m of M; MEMIT, EMMET and LocFT-BF
#      at every m of LOCATED_M (default: M). MALMEN and MEND meta-train anew at each m for STEPS meta-steps (the
#      same budget at every m), then validate at that m; the others edit the validation records directly.
#      VALID_STEPS groups per seed.
#   3. aggregate.py: OUT/results/summary.csv, massive_counterfact.md (a row per m and editor: ES/GS/LS,
#      efficacy/paraphrase/neighborhood, wall and CPU time) and massive_counterfact.png (against m, log axis);
#      with README=PATH, readme_tables.py: the same as data in RESULTS/massive_counterfact/ (std over validation
#      groups, each row's command) and rendered between the <!-- table:massive_counterfact --> markers of PATH
# Resumable: rerun the same command with the same OUT (main.py keeps a cell with results.json of its config and
# continues a MALMEN/MEND cell's meta-training from its checkpoint.pt; any other cell starts again). A MEMIT/EMMET
# cell restarts, but the target vectors its interrupted run finished are read back from cache_dir
# (editor.cache_targets: cached per request).
# Environment [default]: DATA [datasets/raw/counterfact.json: scripts/download_data.py counterfact puts ROME's file
#   there; or the flat counterfact-train.json of MEND/EasyEdit]  N_TRAIN [8000]  N_VALID [2000]  M ["128 256 512 1024"]
#   LOCATED_M [M]  EDITORS ["malmen mend ft memit emmet locft_bf"]  SEEDS ["0"]  STEPS [20]
#   VALID_STEPS [3]  OUT [multirun/massive_counterfact/<date>]  README [unset: no README or results/ is touched; e.g. docs/experiments.md]  RESULTS [results]
# Extra arguments go to every main.py run, e.g. model_device=cuda.
set -uo pipefail; cd "$(dirname "$0")/.."; dir=${OUT:-multirun/massive_counterfact/$(date +%Y-%m-%d_%H-%M-%S)}
status=0
if [ ! -f "$dir/split/split.json" ]; then
  python scripts/split_records.py "${DATA:-datasets/raw/counterfact.json}" "$dir/split" --format counterfact \
    --by-subject --seed 0 --n-train "${N_TRAIN:-8000}" --n-valid "${N_VALID:-2000}" || exit $?
fi
list() { echo $* | tr ' ' ','; }  # "128 256" -> 128,256
editors=" ${EDITORS:-malmen mend ft memit emmet locft_bf} "
pick() { list $(for e in "$@"; do [[ $editors == *" $e "* ]] && echo "$e"; done); }
at_m=$(pick malmen mend ft); located=$(pick memit emmet locft_bf)
grid=(experiment=massive_counterfact split_dir="$dir/split" seed="$(list ${SEEDS:-0})" max_train_steps="${STEPS:-20}"
      max_valid_steps="${VALID_STEPS:-3}" hydra.sweep.dir="$dir/results")
if [ -n "$at_m" ]; then
  python main.py -m "${grid[@]}" editor="$at_m" data.n_edits="$(list ${M:-128 256 512 1024})" "$@" || status=$?
fi
if [ -n "$located" ]; then
  python main.py -m "${grid[@]}" editor="$located" data.n_edits="$(list ${LOCATED_M:-${M:-128 256 512 1024}})" "$@" \
    || status=$?
fi
python scripts/aggregate.py "$dir/results" || exit $?
if [ -n "${README:-}" ]; then  # the table as data in RESULTS/massive_counterfact/, then the README's block from it
  python scripts/readme_tables.py table "$dir/results" --save massive_counterfact --results "${RESULTS:-results}" --readme "$README" --times --spread groups \
    --made-by "OUT=DIR scripts/massive_counterfact.sh" || exit $?
fi
exit $status
