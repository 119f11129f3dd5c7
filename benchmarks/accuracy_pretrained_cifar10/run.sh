#!/usr/bin/env bash
# The grid of PROTOCOL.md, in the order of its 22:13 change; each step resumes (runs.jsonl). Usage: run.sh SHARED_DIR
set -euo pipefail
shared=${1:?usage: run.sh PATH/TO/shared}
here=$(dirname "$0")
common=(--model_name cifar_resnet20 --pretrained_weights "$shared/models/cifar_resnet20/resnet20-12fca82f.th"
        --dataset_name "$shared/data/cifar10" --fractions 0.1 --epochs 4 --selection_interval 2 --batch_size 128
        --lr 5e-4 --scale 0.6 1 --color_jitter 0 --score_cache_dir "${TMPDIR:-/tmp}/acs_score_cache")
w2=(--bits 2 --float_activations --output_dir "$here/w2a32")
w4=(--bits 4 --output_dir "$here/w4a4")
all=(random_dynamic acs "acs@reuse=1,pool=0.2" "random_dynamic@f=0.3")
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
for folder in w2a32 w4a4; do
    python recipes/benchmark_accuracy.py "${common[@]}" --output_dir "$here/$folder" --summarize_only \
        --methods "${all[@]}" --seeds 0 1 2
done
