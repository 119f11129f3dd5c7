"""Run by test_distributed.py under `accelerate launch --multi_gpu --num_processes 2` (gloo, CPU).

Usage: ddp_script.py OUT_DIR JOBS_JSON [--no_use_cpu]

JOBS_JSON is a list of jobs run one after the other in the same two processes (one launch,
several runs): trainings ``{"run": NAME, "save_steps": K?, "resume": CHECKPOINT?, "diverge": bool?,
"family": "timm" | "transformers"?}`` (with ``diverge`` rank 1 selects another subset than rank 0;
``family`` picks the tiny model, see trainer_utils.models), or ``{"run": NAME, "prepare": DIR}``,
which prepares the parquet dataset in DIR with ``--skip_bad_images`` as run_acs does, logging every
image check to <run>_checks/. Writes started_rank<r> first (the launch worked), then
<run>_rank<r>.json with what each process saw.
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


def prepare(job: dict) -> dict:
    from transformers import TrainingArguments

    import acs_hf.data.images
    from acs_hf.run.arguments import DataArguments, ModelArguments
    from acs_hf.run.recipe import prepare_run_data

    checks = out / f"{job['run']}_checks"
    checks.mkdir(exist_ok=True)
    decodable = acs_hf.data.images._decodable

    def logged_decodable(value, _checks=str(checks), _decodable=decodable):
        with open(os.path.join(_checks, str(os.getpid())), "a") as f:
            f.write("1\n")
        return _decodable(value)

    acs_hf.data.images._decodable = logged_decodable
    data_args = DataArguments(dataset_name=job["prepare"], skip_bad_images=True, cache_dir=str(out / "hf_cache"))
    model_args = ModelArguments(model_name="test_resnet", pretrained=False, image_size=16)
    args = TrainingArguments(output_dir=str(out / job["run"]), use_cpu=True, report_to=[])
    ds, _ = prepare_run_data(model_args, data_args, args)
    return {"num_skipped": ds.num_skipped, "train_rows": len(ds.train_dataset), "fingerprint": ds.fingerprint}


trainer = None
for job in jobs:
    if "prepare" in job:
        (out / f"{job['run']}_rank{rank}.json").write_text(json.dumps(prepare(job)))
        continue
    save = {"save_strategy": "steps", "save_steps": job["save_steps"]} if job.get("save_steps") else {}
    trainer = acs_trainer(
        out / job["run"],
        {"fraction": 0.25, "selection_interval": 1},
        {"num_train_epochs": 3, "per_device_train_batch_size": 2, "use_cpu": "--no_use_cpu" not in sys.argv, **save},
        ds=tiny_dataset(47),  # 47 samples: uneven scoring shards, padding duplicates in the gather
        family=job.get("family", "timm"),
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
