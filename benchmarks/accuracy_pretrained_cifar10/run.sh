#!/usr/bin/env bash
# The grid of PROTOCOL.md: W2A32 then W4A4, each resumable (runs.jsonl). Usage: run.sh SHARED_DIR
set -euo pipefail
shared=${1:?usage: run.sh PATH/TO/shared}
here=$(dirname "$0")
common=(--model_name cifar_resnet20 --pretrained_weights "$shared/models/cifar_resnet20/resnet20-12fca82f.th"
        --dataset_name "$shared/data/cifar10" --fractions 0.1
        --methods random_dynamic acs "acs@reuse=1,pool=0.2" "random_dynamic@f=0.3"
        --seeds 0 1 2 --epochs 4 --selection_interval 2 --batch_size 128 --lr 5e-4
        --scale 0.6 1 --color_jitter 0 --score_cache_dir "${TMPDIR:-/tmp}/acs_score_cache")
python recipes/benchmark_accuracy.py "${common[@]}" --bits 2 --float_activations --output_dir "$here/w2a32"
python recipes/benchmark_accuracy.py "${common[@]}" --bits 4 --output_dir "$here/w4a4"
