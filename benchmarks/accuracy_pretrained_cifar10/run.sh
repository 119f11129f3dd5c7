#!/usr/bin/env bash
# The grid of PROTOCOL.md, in the order of its 22:13 change; each step resumes (runs.jsonl). Usage: run.sh SHARED_DIR
set -euo pipefail
shared=${1:?usage: run.sh PATH/TO/shared}
here=$(dirname "$0")
source "$here/common.sh"
python recipes/benchmark_accuracy.py "${common[@]}" "${w2[@]}" --seeds 0 --methods "${all[@]}"
for seed in 0 1 2; do
    python recipes/benchmark_accuracy.py "${common[@]}" "${w4[@]}" --seeds "$seed" --methods random_dynamic acs
    if [ "$seed" != 0 ]; then
        python recipes/benchmark_accuracy.py "${common[@]}" "${w2[@]}" --seeds "$seed" --methods random_dynamic acs
    fi
done
for seed in 1 2; do
    python recipes/benchmark_accuracy.py "${common[@]}" "${w2[@]}" --seeds "$seed" --methods "${all[@]}"
done
# the tables, JSON and plots of every run in each folder
python recipes/benchmark_accuracy.py "${common[@]}" "${w2[@]}" --summarize_only --methods "${all[@]}" --seeds 0 1 2
python recipes/benchmark_accuracy.py "${common[@]}" "${w4[@]}" --summarize_only --methods "${all[@]}" --seeds 0 1 2
