#!/usr/bin/env bash
# PROTOCOL.md's 22:23 addition, after run.sh: W4A4's other two cells, then the full-data ceilings. Usage: run_more.sh SHARED_DIR
set -euo pipefail
shared=${1:?usage: run_more.sh PATH/TO/shared}
here=$(dirname "$0")
common=(--model_name cifar_resnet20 --pretrained_weights "$shared/models/cifar_resnet20/resnet20-12fca82f.th"
        --dataset_name "$shared/data/cifar10" --fractions 0.1 --epochs 4 --selection_interval 2 --batch_size 128
        --lr 5e-4 --scale 0.6 1 --color_jitter 0 --score_cache_dir "${TMPDIR:-/tmp}/acs_score_cache")
w2=(--bits 2 --float_activations --output_dir "$here/w2a32")
w4=(--bits 4 --output_dir "$here/w4a4")
for seed in 0 1 2; do
    python recipes/benchmark_accuracy.py "${common[@]}" "${w4[@]}" --seeds "$seed" \
        --methods random_dynamic "acs@reuse=1,pool=0.2" "random_dynamic@f=0.3"
done
python recipes/benchmark_accuracy.py "${common[@]}" "${w2[@]}" --seeds 0 --methods random_dynamic full
python recipes/benchmark_accuracy.py "${common[@]}" "${w4[@]}" --seeds 0 --methods random_dynamic full
