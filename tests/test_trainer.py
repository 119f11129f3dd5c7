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

from acs_hf import ACSArguments, ACSTrainer, QuantConfig
from acs_hf.training.sampler import CoresetSampler, subset_hash


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fraction", "batch", "accum", "drop_last"),
    [(0.25, 4, 1, False), (0.3, 4, 2, False), (0.5, 5, 1, True), (0.2, 4, 3, False)],
)
def test_exact_steps_per_epoch(tmp_path, fraction, batch, accum, drop_last):
    n, epochs = 48, 2
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_random_dynamic_changes_every_round(tmp_path):
    trainer = acs_trainer(
        tmp_path, {"selection_method": "random_dynamic", "selection_interval": 1}, {"num_train_epochs": 3}
    )
    trainer.train()
    assert len({r["subset_hash"] for r in trainer.history}) == 3


class LabelledView(torch.utils.data.Dataset):
    """A score view that offers its labels, as acs_hf.data's views do."""

    def __init__(self, ds):
        self.ds, self.labels = ds, np.asarray(ds["labels"])

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["random_dynamic", "random_static"])
def test_label_only_selectors_decode_no_image(tmp_path, method):
    """With a score view that offers ``labels``, random selection never runs the scoring loader
    and picks the subsets that the pass over the loader picks."""
    ds = tiny_dataset()
    acs = {"selection_method": method, "selection_interval": 1}
    through_loader = acs_trainer(tmp_path / "a", acs, {"num_train_epochs": 3}, ds=ds)
    # A view without labels (a datasets.Dataset's "labels" column would be read directly).
    through_loader.rounds.statistics.score_dataset = torch.utils.data.Subset(ds, range(len(ds)))
    through_loader.train()
    from_labels = acs_trainer(tmp_path / "b", acs, {"num_train_epochs": 3}, ds=ds)
    scorer = from_labels.rounds.statistics
    scorer.score_dataset = LabelledView(ds)
    scorer.score_dataloader = lambda: pytest.fail("the scoring loader ran for a label-only selector")
    from_labels.train()
    assert [r["subset_hash"] for r in from_labels.history] == [r["subset_hash"] for r in through_loader.history]
    assert "data_seconds" in through_loader.history[0] and "data_seconds" not in from_labels.history[0]


@pytest.mark.slow
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


@pytest.mark.slow
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


def expected_decay(model) -> set[str]:
    """By the rule, from module types alone: only conv/linear weights decay."""
    return {
        f"{name}.weight"
        for name, m in model.named_modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.weight.requires_grad
    }


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
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == expected_decay(model)
    assert set(trainer.get_decay_parameter_names(model)) == expected_decay(model)
    # The first layer's input step is fixed (image input): not in the optimizer at all.
    first = model.get_submodule("conv1.0")
    assert id(first.input_quantizer.step) not in {id(p) for g in groups for p in g["params"]}


def test_decay_rules_on_a_vit(tmp_path):
    """LayerNorm weights, position embeddings' neighbours (biases) and LSQ steps get no decay."""
    import timm

    from acs_hf import QATTrainer, quantize_model

    model = quantize_model(timm.create_model("test_vit", num_classes=NUM_CLASSES, img_size=16), QuantConfig())
    trainer = QATTrainer(model=model, args=training_args(tmp_path), train_dataset=tiny_dataset())
    names = set(trainer.get_decay_parameter_names(model))
    assert names == expected_decay(model)
    assert any(".norm1." in n for n, _ in model.named_parameters()) and not any(".norm1." in n for n in names)


@pytest.mark.slow
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


@pytest.mark.slow
def test_bf16_run_matches_fp32(tmp_path):
    """The first step (same model, same batch) gives the fp32 loss to bf16 precision, and the
    student's convolutions really run in bf16 under the trainer's autocast."""

    def first_step(bf16):
        t = acs_trainer(tmp_path / str(bf16), args_kwargs={"num_train_epochs": 1, "bf16": bf16, "max_steps": 1})
        dtypes = set()
        t.model.layer1[0].conv1.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype) if m.training else None)
        t.train()
        return next(h["loss"] for h in t.state.log_history if "loss" in h), dtypes

    fp32, fp32_dtypes = first_step(False)
    bf16, bf16_dtypes = first_step(True)
    assert fp32_dtypes == {torch.float32} and bf16_dtypes == {torch.bfloat16}
    assert bf16 == pytest.approx(fp32, rel=3e-2) and bf16 != fp32


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
        ({"step_lr_scale": float("inf")}, "step_lr_scale"),
        ({"kd_alpha": float("nan")}, "kd_alpha"),
        ({"fraction": None}, "fraction"),
        ({"selection_method": "random_dynamic", "evs_schedule": "cosnie"}, "evs_schedule='cosnie'"),
        # the one number check: argument, value and what is accepted, in full
        ({"kd_temperature": 0}, r"^kd_temperature must be a finite number > 0, got 0$"),
        ({"kd_alpha": True}, r"^kd_alpha must be a finite number in \[0, 1\], got True$"),
        ({"calibration_batches": 1.5}, r"^calibration_batches must be an integer >= 1, got 1.5$"),
        ({"score_batch_size": 2.5}, r"^score_batch_size must be an integer >= 1 or unset, got 2.5$"),
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


@pytest.mark.slow
def test_epoch_begin_runs_before_the_sampler_is_iterated(tmp_path):
    """The contract ACSTrainer relies on, checked against the installed transformers."""
    from transformers import TrainerCallback

    events = []
    trainer = acs_trainer(tmp_path, {"selection_interval": 1}, {"num_train_epochs": 2})

    class Spy(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kwargs):
            events.append(("epoch_begin", trainer.selected_epoch))

    trainer.add_callback(Spy())
    sampler_iter = CoresetSampler.__iter__

    def spying_iter(self):
        events.append(("iter", self.epoch))
        return sampler_iter(self)

    CoresetSampler.__iter__ = spying_iter
    try:
        trainer.train()
    finally:
        CoresetSampler.__iter__ = sampler_iter
    # Spy runs after the selection callback: by then the epoch's subset is chosen; iteration follows.
    assert events == [("epoch_begin", 0), ("iter", 0), ("epoch_begin", 1), ("iter", 1)]


def test_cross_entropy_only_without_teacher(tmp_path):
    ds = tiny_dataset()
    student, _ = models()
    trainer = ACSTrainer(
        model=student,
        args=training_args(tmp_path),
        train_dataset=ds,
        acs_args=ACSArguments(selection_method="evs", fraction=0.25),
        score_dataset=ds,
    )
    batch = ds[:6]
    trainer.calibrate()
    loss = trainer.compute_loss(student, batch)
    expected = torch.nn.functional.cross_entropy(student(batch["pixel_values"]).double(), batch["labels"])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.slow
def test_compile_kernels_through_the_trainer(tmp_path):
    torch._dynamo.reset()
    eager = acs_trainer(tmp_path / "e", args_kwargs={"num_train_epochs": 1, "max_steps": 2})
    compiled = acs_trainer(
        tmp_path / "c", args_kwargs={"num_train_epochs": 1, "max_steps": 2}, config=QuantConfig(compile_kernels=True)
    )
    assert all(q.compiled for q in compiled.model.modules() if hasattr(q, "compiled"))
    eager.train()
    compiled.train()

    def losses(t):
        return [h["loss"] for h in t.state.log_history if "loss" in h]

    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-4)


@pytest.mark.slow
def test_single_sample_last_batch_trains(tmp_path):
    """49 samples at batch 4 on the full selector: the last batch has one sample (BatchNorm needs two)."""
    ds = tiny_dataset(49)
    trainer = acs_trainer(tmp_path, {"selection_method": "full", "fraction": 1.0}, {"num_train_epochs": 1}, ds=ds)
    trainer.train()
    assert trainer.state.global_step == 13 and len(trainer.recorder.seen[0]) == 49


@pytest.mark.slow
def test_interrupted_save_keeps_the_last_complete_checkpoint(tmp_path, monkeypatch):
    """A crash after the ACS state and before the Trainer finished its save: the newest checkpoint is
    incomplete, the previous complete one was not rotated away, and resuming from the incomplete one
    is refused naming the complete one."""
    from acs_hf.training.checkpoints import latest_complete_checkpoint

    args = {"num_train_epochs": 3, "save_strategy": "epoch", "save_total_limit": 1}
    trainer = acs_trainer(tmp_path, args_kwargs=args)
    original = ACSTrainer._save_rng_state
    calls = []

    def crash_on_second_save(self, output_dir):
        calls.append(output_dir)
        if len(calls) == 2:
            raise KeyboardInterrupt("preempted while saving")
        return original(self, output_dir)

    monkeypatch.setattr(ACSTrainer, "_save_rng_state", crash_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert latest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-3"
    monkeypatch.setattr(ACSTrainer, "_save_rng_state", original)
    resumed = acs_trainer(tmp_path / "b", args_kwargs=args)
    with pytest.raises(FileNotFoundError, match="checkpoint-6 has no trainer_state.json.*checkpoint-3"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))


@pytest.mark.slow
def test_resume_on_other_data_refused(tmp_path):
    args = {"num_train_epochs": 2, "save_strategy": "epoch"}
    acs_trainer(tmp_path / "a", args_kwargs=args).train()
    other = tiny_dataset(seed=1)  # same size and labels, other images
    resumed = acs_trainer(tmp_path / "b", args_kwargs=args, ds=other)
    with pytest.raises(ValueError, match="trained on other data"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))


@pytest.mark.slow
def test_damaged_checkpoint_files_are_named(tmp_path):
    args = {"num_train_epochs": 2, "save_strategy": "epoch"}
    acs_trainer(tmp_path / "a", args_kwargs=args).train()
    ckpt = tmp_path / "a" / "checkpoint-3"
    state = ckpt / "acs_state.json"
    data = state.read_bytes()
    state.write_bytes(data[:20])
    with pytest.raises(ValueError, match="acs_state.json is corrupt.*earlier checkpoint"):
        acs_trainer(tmp_path / "b", args_kwargs=args).train(resume_from_checkpoint=str(ckpt))
    state.write_bytes(data)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="checkpoint-3 cannot be loaded.*damaged"):
        acs_trainer(tmp_path / "c", args_kwargs=args).train(resume_from_checkpoint=str(ckpt))
