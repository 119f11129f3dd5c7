#!/usr/bin/env bash
# PROTOCOL.md's 22:23 addition, after run.sh: W4A4's other two cells, then the full-data ceilings. Usage: run_more.sh SHARED_DIR
set -euo pipefail
shared=${1:?usage: run_more.sh PATH/TO/shared}
here=$(dirname "$0")
source "$here/common.sh"
for seed in 0 1 2; do
    python recipes/benchmark_accuracy.py "${common[@]}" "${w4[@]}" --seeds "$seed" \
        --methods random_dynamic "acs@reuse=1,pool=0.2" "random_dynamic@f=0.3"
done
python recipes/benchmark_accuracy.py "${common[@]}" "${w2[@]}" --seeds 0 --methods random_dynamic full
python recipes/benchmark_accuracy.py "${common[@]}" "${w4[@]}" --seeds 0 --methods random_dynamic full
