#!/usr/bin/env bash
# Slow, not in CI (about 8 min on a 2-core CPU): does the README's default experiment reproduce?
# Reruns `python main.py` with seed 0 and 1 thread from an EMPTY cache (a fresh world and toy LM,
# in a temporary cache_dir removed at the end), then compares its ES/GS/LS with the README table
# between <!-- table:default_seed0 --> and <!-- /table:default_seed0 --> (scripts/readme_tables.py check).
#
# usage: scripts/reproduce_readme.sh [main.py overrides ...]      e.g. model_device=cuda
#        README_TOL=0.05 scripts/reproduce_readme.sh              tolerance on |run - README| (default 0.03)
# Exit status: 0 every value within the tolerance, 1 one differs, 2 bad input; main.py's own on failure.
# The run directory (results.json, checkpoint.pt) stays in outputs/reproduce/<date>/.
#
# The README table it reads is the one `readme_tables.py table` writes, e.g.
#   python scripts/readme_tables.py table outputs/reproduce/<date> --readme README.md --name default_seed0
# gives, between the markers:
#   | m = 256 (toy-gpt2, synthetic) | seeds | ES | GS | LS |
#   |---|---|---|---|---|
#   | before editing | 1 | 0.000 | 0.000 | 1.000 |
#   | MALMEN | 1 | 0.488 | 0.391 | 0.969 |
#   Commands: ... Commit ...; machine: ...
# Columns are found by their headers ES, GS and LS; rows by their first cell; a cell's first number is
# its value ("0.488 (0.015)" reads 0.488). Rows the rerun has ("before editing", "MALMEN") are compared.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=$(mktemp -d -t malmen-cache.XXXXXX)
trap 'rm -rf "$cache"' EXIT
run=outputs/reproduce/$(date +%Y-%m-%d_%H-%M-%S)
# Later overrides win: "$@" can change anything, the seed and the threads included.
python main.py seed=0 threads=1 cache_dir="$cache" hydra.run.dir="$run" "$@"
python scripts/readme_tables.py check "$run" --readme README.md --name default_seed0 --tol "${README_TOL:-0.03}"
