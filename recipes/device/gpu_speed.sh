#!/usr/bin/env bash
# The GPU measurements of issue 15 in one command, at 224x224, bf16, channels_last, batch 256:
#   1. recipes/device/gpu_check.py: the LSQ op and the whole compiled model against float64 (gate);
#   2. the QAT step: eager, fused kernels and the whole model compiled (qat_over_fp_step*);
#   3. the real data path: JPEGs through datasets + timm transforms in DataLoader workers, scoring
#      rounds with the decoded score-view cache, ACS/full wall clock with decoding.
# Each part writes its JSON as soon as it ends (a timeout keeps what finished), under OUT_DIR.
#
#   recipes/device/gpu_speed.sh [OUT_DIR]       # default benchmarks/
#   DRY_RUN=1 recipes/device/gpu_speed.sh /tmp/x  # tiny sizes on the CPU: tries the script itself
#
# The GPU image has no `datasets`: carry wheels (see the device tool's README) in .whl/ and set
# WHEELS=.whl; they are installed into /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-benchmarks}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
if [ -n "${WHEELS:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if [ -n "${DRY_RUN:-}" ]; then
  DEV=(--device cpu) SIZES=(--image_size 32 --batch_size 8 --pairs 1) JPEG=(--jpeg_samples 40 --num_workers 1)
  TAG=dryrun
else
  DEV=(--device cuda --bf16 --channels_last) SIZES=(--image_size 224 --batch_size 256 --pairs 10)
  WORKERS=$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))
  JPEG=(--jpeg_samples 8192 --num_workers "$WORKERS" --wallclock_batch_size 256)
  TAG=$($PY -c "import torch; print(torch.cuda.get_device_name().split()[-1].lower())")
fi
$PY - <<'EOF' | tee "$OUT/gpu_env_$TAG.txt"
import platform, torch, timm, transformers
print("card:", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "| python", platform.python_version(),
      "| torch", torch.__version__, "| timm", timm.__version__, "| transformers", transformers.__version__)
EOF
$PY recipes/device/gpu_check.py 2>&1 | tee "$OUT/gpu_check_$TAG.log"
$PY recipes/benchmark_speed.py "${DEV[@]}" "${SIZES[@]}" --skip checkpoint select scoring wallclock jpeg \
  --output_json "$OUT/speed_step_$TAG.json"
$PY recipes/benchmark_speed.py "${DEV[@]}" "${SIZES[@]}" --data jpeg "${JPEG[@]}" --jpeg_dir /tmp/acs_jpeg \
  --skip step compiled_model checkpoint select --output_json "$OUT/speed_jpeg_$TAG.json"
