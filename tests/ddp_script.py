"""Run by test_distributed.py under `accelerate launch --multi_gpu --num_processes 2` (gloo, CPU).

Usage: ddp_script.py OUT_DIR JOBS_JSON [--no_use_cpu]

JOBS_JSON is a list of trainings run one after the other in the same two processes (one launch,
several runs): ``{"run": NAME, "save_steps": K?, "resume": CHECKPOINT?, "diverge": bool?}``; with
``diverge`` rank 1 selects another subset than rank 0. Writes started_rank<r>
first (the launch worked), then <run>_rank<r>.json with what each process saw.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from trainer_utils import acs_trainer, tiny_dataset  # noqa: E402

out, jobs = Path(sys.argv[1]), json.loads(sys.argv[2])
rank = int(os.environ.get("RANK", "0"))
out.mkdir(parents=True, exist_ok=True)
(out / f"started_rank{rank}").write_text("1")

trainer = None
for job in jobs:
    save = {"save_strategy": "steps", "save_steps": job["save_steps"]} if job.get("save_steps") else {}
    trainer = acs_trainer(
        out / job["run"],
        {"fraction": 0.25, "selection_interval": 1},
        {"num_train_epochs": 3, "per_device_train_batch_size": 2, "use_cpu": "--no_use_cpu" not in sys.argv, **save},
        ds=tiny_dataset(47),  # 47 samples: uneven scoring shards, padding duplicates in the gather
    )
    if job.get("diverge") and rank == 1:
        select = trainer.selector.select

        def diverged(*a, _select=select, _n=trainer.num_samples, **kw):
            subset = _select(*a, **kw)
            return torch.sort((subset + 1) % _n).values

        trainer.selector.select = diverged
    trainer.train(resume_from_checkpoint=job.get("resume"))
    result = {
        "world_size": trainer.accelerator.num_processes,
        "hashes": {r["epoch"]: r["subset_hash"] for r in trainer.history},
        "seen": trainer.recorder.seen,
        "global_step": trainer.state.global_step,
    }
    (out / f"{job['run']}_rank{rank}.json").write_text(json.dumps(result))
trainer.end()  # barrier + destroy the gloo group while the interpreter is fully alive
