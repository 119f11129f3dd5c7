"""Run by test_distributed.py under `accelerate launch --multi_gpu --num_processes 2` (gloo, CPU).

Usage: ddp_script.py OUT_DIR [--diverge] [--no_use_cpu] [--save_steps K] [--resume CKPT] [--run NAME]
                     [--teacher_cache_dir DIR]

Writes started_rank<r> first (the launch worked), then rank<r>.json with what the process saw.
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from trainer_utils import acs_trainer, tiny_dataset  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("out", type=Path)
parser.add_argument("--diverge", action="store_true")
parser.add_argument("--no_use_cpu", action="store_true")
parser.add_argument("--save_steps", type=int, default=None)
parser.add_argument("--resume", default=None)
parser.add_argument("--run", default="run")
parser.add_argument("--teacher_cache_dir", default=None)
args = parser.parse_args()

rank = int(os.environ.get("RANK", "0"))
args.out.mkdir(parents=True, exist_ok=True)
(args.out / f"started_rank{rank}").write_text("1")

save = {"save_strategy": "steps", "save_steps": args.save_steps} if args.save_steps else {}
trainer = acs_trainer(
    args.out / args.run,
    {"fraction": 0.25, "selection_interval": 1, "teacher_cache_dir": args.teacher_cache_dir},
    {"num_train_epochs": 3, "per_device_train_batch_size": 2, "use_cpu": not args.no_use_cpu, **save},
    ds=tiny_dataset(47),  # 47 samples: uneven scoring shards, padding duplicates in the gather
)
if args.diverge and rank == 1:
    select = trainer.selector.select

    def diverged(*a, **kw):
        subset = select(*a, **kw)
        return torch.sort((subset + 1) % trainer.num_samples).values

    trainer.selector.select = diverged
trainer.train(resume_from_checkpoint=args.resume)
result = {
    "world_size": trainer.accelerator.num_processes,
    "hashes": {r["epoch"]: r["subset_hash"] for r in trainer.history},
    "seen": trainer.recorder.seen,
    "global_step": trainer.state.global_step,
}
(args.out / f"{args.run}_rank{rank}.json").write_text(json.dumps(result))
trainer.end()  # barrier + destroy the gloo group while the interpreter is fully alive
