#!/usr/bin/env python
"""What ACS / full-data QAT costs on one 8-GPU node, from measured throughputs (no GPU needed).

    python recipes/node_cost_model.py --cpu_json benchmarks/speed_cpu_jpeg.json \\
        --gpu_json benchmarks/speed_cuda_h100_run1.json --cores 32 64 128 256

Per CPU core (one DataLoader worker): ``decode_train_images_per_s_per_worker`` (training view),
``decode_images_per_s_per_worker`` (scoring view, decoded) and ``cached_view_images_per_s_per_worker``
(scoring view from the score-view cache) from ``benchmark_speed.py --data jpeg``. Per GPU:
``qat_train_images_per_s`` from ``benchmark_speed.py --device cuda``; scoring is a forward pass,
taken as ``--infer_over_train`` (default 3) times the training rate unless ``--gpu_infer`` is given.
Each stage runs at the slower of the GPUs and the loader workers (cores minus one per GPU process).
ImageNet-1k schedule of the paper: N = 1,281,167, 120 epochs, f = 0.1, R = 10 (12 rounds).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

N, EPOCHS, FRACTION, INTERVAL = 1_281_167, 120, 0.1, 10


def node_table(rates: dict, gpus: int, cores: list[int]) -> list[dict]:
    rows = []
    for k in cores:
        workers = max(k - gpus, 1)
        train = min(gpus * rates["gpu_train"], workers * rates["decode_train"])
        score = min(gpus * rates["gpu_infer"], workers * rates["decode_score"])
        cached = min(gpus * rates["gpu_infer"], workers * rates["cached_score"])
        rounds = EPOCHS // INTERVAL
        full = EPOCHS * N / train
        acs_plain = FRACTION * full + rounds * N / score
        acs_cached = FRACTION * full + N / score + (rounds - 1) * N / cached
        rows.append({
            "cores": k,
            "full_hours": full / 3600,
            "acs_over_full": acs_plain / full,
            "acs_over_full_cached": acs_cached / full,
            "train_bound": "GPU" if gpus * rates["gpu_train"] <= workers * rates["decode_train"] else "CPU",
            "workers_to_feed_training": gpus * rates["gpu_train"] / rates["decode_train"],
            "workers_to_feed_scoring": gpus * rates["gpu_infer"] / rates["decode_score"],
            "workers_to_feed_cached_scoring": gpus * rates["gpu_infer"] / rates["cached_score"],
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu_json", type=Path, required=True, help="benchmark_speed.py --data jpeg output")
    parser.add_argument("--gpu_json", type=Path, required=True, help="benchmark_speed.py --device cuda output")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--cores", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--gpu_infer", type=float, default=None, help="student inference images/s per GPU")
    parser.add_argument("--infer_over_train", type=float, default=3.0)
    args = parser.parse_args(argv)
    cpu, gpu = json.loads(args.cpu_json.read_text()), json.loads(args.gpu_json.read_text())
    rates = {
        "decode_train": cpu["decode_train_images_per_s_per_worker"],
        "decode_score": cpu["decode_images_per_s_per_worker"],
        # Older JSON lacks the cached read rate: the cached round's rate (model included) bounds it below.
        "cached_score": cpu.get("cached_view_images_per_s_per_worker", cpu["score_images_per_s_later"]),
        "gpu_train": gpu["qat_train_images_per_s"],
        "gpu_infer": args.gpu_infer or args.infer_over_train * gpu["qat_train_images_per_s"],
    }
    print("rates (images/s):", {k: round(v) for k, v in rates.items()})
    rows = node_table(rates, args.gpus, args.cores)
    print("\n| cores | full QAT (h) | ACS/full | ACS/full, score cache | training bound by | workers to feed "
          "training / scoring / cached scoring |\n|---|---|---|---|---|---|")  # fmt: skip
    for r in rows:
        print(f"| {r['cores']} | {r['full_hours']:.1f} | {r['acs_over_full']:.3f} | {r['acs_over_full_cached']:.3f} | "
              f"{r['train_bound']} | {r['workers_to_feed_training']:.0f} / {r['workers_to_feed_scoring']:.0f} / "
              f"{r['workers_to_feed_cached_scoring']:.0f} |")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
