"""Run by test_distributed.py under `accelerate launch --multi_gpu --num_processes 2` (gloo, CPU).

Usage: ddp_script.py OUT_DIR [--diverge] [--no_use_cpu]
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from trainer_utils import acs_trainer  # noqa: E402

out = Path(sys.argv[1])
rank = int(os.environ.get("RANK", "0"))
out.mkdir(parents=True, exist_ok=True)
(out / f"started_rank{rank}").write_text("1")

trainer = acs_trainer(
    out / "run",
    {"fraction": 0.25, "selection_interval": 1, "selection_method": "acs"},
    {"num_train_epochs": 3, "per_device_train_batch_size": 2, "use_cpu": "--no_use_cpu" not in sys.argv},
)
if "--diverge" in sys.argv and rank == 1:
    select = trainer.selector.select

    def diverged(*args, **kwargs):
        subset = select(*args, **kwargs)
        return torch.sort((subset + 1) % trainer.num_samples).values

    trainer.selector.select = diverged
trainer.train()
result = {
    "world_size": trainer.accelerator.num_processes,
    "hashes": [r["subset_hash"] for r in trainer.history],
    "seen": trainer.recorder.seen,
}
(out / f"rank{rank}.json").write_text(json.dumps(result))
