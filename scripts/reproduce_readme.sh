#!/usr/bin/env bash
# Slow, not in CI (about 7 min on a 2-core CPU): does the README's default experiment reproduce?
# Reruns `python main.py` (SmolLM2, invented people, MALMEN at m = 64) with seed 0 from an EMPTY cache (the model
# converted again, the facts generated again, in a temporary cache_dir removed at the end), then compares its
# ES/GS/LS with the README's default table, whose data is results/default/summary.csv
# (scripts/readme_tables.py check): each value within K times that row's std over the 3 seeds.
#
# usage: scripts/reproduce_readme.sh [main.py overrides ...]      e.g. threads=2 (another summation order)
#        README_K=2 scripts/reproduce_readme.sh                    K (default 3)
# Exit status: 0 every value within the tolerance, 1 one differs, 2 bad input; main.py's own on failure.
# The run directory (results.json, checkpoint.pt) stays in outputs/reproduce/<date>/.
#
# The data it reads is what `readme_tables.py table` saved from the 3 seeds' runs, e.g.
#   python scripts/readme_tables.py table outputs/default_seeds --save default --readme README.md
# rows "before editing" and "MALMEN" with each score's mean and std. Rows the rerun has are compared.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=$(mktemp -d -t malmen-cache.XXXXXX)
trap 'rm -rf "$cache"' EXIT
run=outputs/reproduce/$(date +%Y-%m-%d_%H-%M-%S)
# Later overrides win: "$@" can change anything, the seed and the threads included.
python main.py seed=0 threads=1 cache_dir="$cache" hydra.run.dir="$run" "$@"
python scripts/readme_tables.py check "$run" --name default --tol-std "${README_K:-3}"
