import math

import numpy as np
import pytest
import torch
from trainer_utils import (
    NUM_CLASSES,
    RecordingPlainTrainer,
    acs_trainer,
    models,
    tiny_dataset,
    training_args,
)

from acs_hf import ACSArguments, ACSTrainer
from acs_hf.trainer import CoresetSampler, subset_hash


@pytest.mark.parametrize(
    ("fraction", "batch", "accum", "drop_last"),
    [(0.25, 4, 1, False), (0.3, 4, 2, False), (0.5, 5, 1, True), (0.2, 4, 3, False)],
)
def test_exact_steps_per_epoch(tmp_path, fraction, batch, accum, drop_last):
    n, epochs = 48, 3
    trainer = acs_trainer(
        tmp_path,
        {"fraction": fraction, "selection_interval": 1},
        {
            "num_train_epochs": epochs,
            "per_device_train_batch_size": batch,
            "gradient_accumulation_steps": accum,
            "dataloader_drop_last": drop_last,
        },
    )
    trainer.train()
    k = math.floor(fraction * n + 0.5)
    batches = k // batch if drop_last else math.ceil(k / batch)
    steps = batches // accum + int(batches % accum > 0)
    assert trainer.state.global_step == epochs * steps
    for epoch in range(epochs):
        seen = trainer.recorder.seen[epoch]
        assert len(seen) == (batches * batch if drop_last else k)
        assert set(seen) <= set(np.load(tmp_path / "selection" / f"epoch_{epoch:04d}.npy").tolist())


def test_subset_changes_only_every_R_epochs(tmp_path):
    trainer = acs_trainer(tmp_path, {"selection_interval": 2}, {"num_train_epochs": 5})
    trainer.train()
    assert [r["epoch"] for r in trainer.history] == [0, 2, 4]
    files = sorted(p.name for p in (tmp_path / "selection").iterdir())
    assert files == ["epoch_0000.npy", "epoch_0002.npy", "epoch_0004.npy"]
    subsets = {e: set(np.load(tmp_path / "selection" / f"epoch_{e:04d}.npy").tolist()) for e in (0, 2, 4)}
    for epoch in range(5):
        seen = trainer.recorder.seen[epoch]
        assert len(seen) == 12 and set(seen) == subsets[epoch - epoch % 2]
    # Each epoch draws its own order.
    assert trainer.recorder.seen[0] != trainer.recorder.seen[1]
    lines = (tmp_path / "acs_selection.jsonl").read_text().splitlines()
    assert len(lines) == 3
    assert (tmp_path / "acs_selection.png").stat().st_size > 1000


def test_random_static_never_changes(tmp_path):
    trainer = acs_trainer(
        tmp_path, {"selection_method": "random_static", "selection_interval": 1}, {"num_train_epochs": 3}
    )
    trainer.train()
    assert len(trainer.history) == 1
    first = set(trainer.recorder.seen[0])
    assert all(set(trainer.recorder.seen[e]) == first for e in range(3))


def test_random_dynamic_changes_every_round(tmp_path):
    trainer = acs_trainer(
        tmp_path, {"selection_method": "random_dynamic", "selection_interval": 1}, {"num_train_epochs": 3}
    )
    trainer.train()
    assert len({r["subset_hash"] for r in trainer.history}) == 3


def test_full_equals_plain_trainer_order(tmp_path):
    ds = tiny_dataset()
    acs = acs_trainer(tmp_path / "acs", {"selection_method": "full", "fraction": 1.0}, {"num_train_epochs": 2}, ds=ds)
    acs.train()
    _, fp_model = models()
    plain = RecordingPlainTrainer(
        model=fp_model,
        args=training_args(tmp_path / "plain", num_train_epochs=2, remove_unused_columns=False),
        train_dataset=ds,
    )
    plain.train()
    assert acs.recorder.seen == plain.recorder.seen
    assert sorted(acs.recorder.seen[0]) == list(range(len(ds)))


def test_teacher_frozen_and_excluded(tmp_path):
    trainer = acs_trainer(tmp_path, args_kwargs={"num_train_epochs": 2, "save_strategy": "epoch"})
    before = {k: v.clone() for k, v in trainer.teacher_model.state_dict().items()}
    trainer.train()
    after = trainer.teacher_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not trainer.teacher_model.training
    opt_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in opt_params for p in trainer.teacher_model.parameters())
    ckpt = sorted(tmp_path.glob("checkpoint-*"))[-1]
    from safetensors.torch import load_file

    saved = load_file(ckpt / "model.safetensors")
    assert set(saved) == set(trainer.model.state_dict())  # the student only


def test_param_groups(tmp_path):
    trainer = acs_trainer(
        tmp_path, {"step_lr_scale": 0.1}, {"num_train_epochs": 1, "weight_decay": 0.05, "learning_rate": 2e-3}
    )
    trainer.create_optimizer()
    model = trainer.model
    groups = trainer.optimizer.param_groups
    steps = {id(p) for n, p in model.named_parameters() if n.endswith("_quantizer.step") and p.requires_grad}
    assert any(n.endswith("weight_quantizer.step") for n, _ in model.named_parameters())
    step_group = [g for g in groups if {id(p) for p in g["params"]} == steps]
    assert len(step_group) == 1 and steps
    assert step_group[0]["lr"] == pytest.approx(2e-3 * 0.1) and step_group[0]["weight_decay"] == 0
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            decayed = g["weight_decay"] > 0
            expect = n.endswith(".weight") and ("conv" in n or n in ("fc.weight",) or "downsample.0" in n)
            assert decayed == expect, n
    # The first layer's input step is fixed (image input): not in the optimizer at all.
    assert id(model.conv1.input_quantizer.step) not in {id(p) for g in groups for p in g["params"]}


def test_resume_mid_epoch_reproduces_run(tmp_path):
    args = {"num_train_epochs": 4, "save_strategy": "steps", "save_steps": 5}
    full = acs_trainer(tmp_path / "a", args_kwargs=args)
    full.train()
    resumed = acs_trainer(tmp_path / "b", args_kwargs=args)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-5"))
    # 3 steps of 4 samples per epoch: step 5 is inside epoch 1 (subset of round 0).
    assert [r["subset_hash"] for r in resumed.history] == [r["subset_hash"] for r in full.history]
    assert resumed.recorder.seen[1] == full.recorder.seen[1][8:]
    for e in (2, 3):
        assert resumed.recorder.seen[e] == full.recorder.seen[e]

    def losses(t):
        return {h["step"]: h["loss"] for h in t.state.log_history if "loss" in h}

    la, lb = losses(full), losses(resumed)
    assert set(range(6, 13)) <= set(lb)  # restored history plus the steps trained after resuming
    for step in range(6, 13):
        assert lb[step] == pytest.approx(la[step], rel=1e-4, abs=1e-5)


def test_bf16_run(tmp_path):
    trainer = acs_trainer(tmp_path, args_kwargs={"num_train_epochs": 2, "bf16": True})
    out = trainer.train()
    assert math.isfinite(out.training_loss)


def test_sampler_is_idempotent_and_fixed_length():
    s = CoresetSampler(5, seed=3)
    with pytest.raises(RuntimeError, match="no subset"):
        list(s)
    s.set_subset(torch.tensor([9, 2, 7, 4, 0]))
    s.set_epoch(1)
    a = list(s)
    s.set_epoch(1)
    assert list(s) == a and sorted(a) == [0, 2, 4, 7, 9] and len(s) == 5
    s.set_epoch(2)
    assert list(s) != a
    with pytest.raises(ValueError, match="fixed at 5"):
        s.set_subset(torch.arange(4))


def test_subset_hash_distinguishes():
    assert subset_hash(torch.arange(5)) == subset_hash(torch.arange(5).int())
    assert subset_hash(torch.arange(5)) != subset_hash(torch.arange(1, 6))


def test_trainer_argument_errors(tmp_path):
    ds = tiny_dataset()
    student, teacher = models()
    args = training_args(tmp_path)
    with pytest.raises(ValueError, match="needs score_dataset"):
        ACSTrainer(model=student, args=args, train_dataset=ds, acs_args=ACSArguments(), teacher_model=teacher)
    with pytest.raises(ValueError, match="same examples in the same order"):
        ACSTrainer(
            model=student,
            args=args,
            train_dataset=ds,
            acs_args=ACSArguments(),
            teacher_model=teacher,
            score_dataset=ds.select(range(10)),
        )
    with pytest.raises(ValueError, match="needs teacher_model"):
        ACSTrainer(model=student, args=args, train_dataset=ds, acs_args=ACSArguments(), score_dataset=ds)
    # EVS-only selection needs no teacher.
    ACSTrainer(
        model=student, args=args, train_dataset=ds, acs_args=ACSArguments(selection_method="evs"), score_dataset=ds
    )


def test_world_size_mismatch_detected(tmp_path, monkeypatch):
    """A launcher started 2 processes but the Trainer runs alone (the real case is in test_distributed)."""
    trainer = acs_trainer(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2.*--use_cpu"):
        trainer._check_distributed()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"selection_method": "glister"}, "selection_method='glister'.*acs"),
        ({"fraction": 0}, "fraction"),
        ({"fraction": 1.5}, "fraction"),
        ({"selection_method": "full", "fraction": 0.5}, "fraction=1"),
        ({"selection_interval": 0}, "selection_interval"),
        ({"evs_schedule": "exp"}, "evs_schedule.*cosine"),
        ({"kd_temperature": 0}, "kd_temperature"),
        ({"kd_alpha": 1.5}, "kd_alpha"),
        ({"step_lr_scale": 0}, "step_lr_scale"),
        ({"score_batch_size": 0}, "score_batch_size"),
    ],
)
def test_acs_arguments_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ACSArguments(**kwargs)


def test_kd_loss_formula(tmp_path):
    trainer = acs_trainer(tmp_path, {"kd_temperature": 2.0, "kd_alpha": 0.7})
    model = trainer.model
    from acs_hf import calibrate_quantizers

    x = torch.randn(6, 3, 16, 16)
    calibrate_quantizers(model, [x])
    labels = torch.randint(0, NUM_CLASSES, (6,))
    loss = trainer.compute_loss(model, {"pixel_values": x, "labels": labels})
    with torch.no_grad():
        s, t = model(x).double(), trainer.teacher_model(x).double()
    pt = torch.softmax(t / 2, -1)
    kd = -(pt * torch.log_softmax(s / 2, -1)).sum(-1).mean() * 4
    ce = torch.nn.functional.cross_entropy(s, labels)
    assert loss.item() == pytest.approx((0.7 * kd + 0.3 * ce).item(), rel=1e-4)
