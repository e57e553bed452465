#!/usr/bin/env bash
# Fig. 9: peak memory of one meta-step against m, two-stage vs MEND-style end to end, GPT-2 (124M, random
# weights). Extra arguments go to scripts/memory_benchmark.py: on a GPU --device cuda; on a CPU a shorter --m list.
set -euo pipefail; cd "$(dirname "$0")/.."
python scripts/memory_benchmark.py --model gpt2 --m 32 64 128 256 512 1024 2048 4096 8192 --out outputs/fig9_memory "$@"
