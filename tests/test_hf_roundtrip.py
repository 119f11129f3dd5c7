"""Round trips in transformers: a checkpoint loaded with ``from_pretrained`` saves with
``save_pretrained`` (and pushes with ``push_to_hub``) in the packed format ``save_quantized``
writes, and a plain ``transformers.Trainer`` continues its QAT. Offline, tiny models."""

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
import torch.nn.functional as F
from huggingface_hub import CommitOperationAdd, HfApi
from safetensors import safe_open
from trainer_utils import models
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)

import acs_hf  # noqa: F401  (registers the quantizer with transformers)
from acs_hf import LSQQuantizer, QuantConfig, calibrate_quantizers, load_quantized, quantize_model, save_quantized
from acs_hf.data import digits_dataset, prepare_datasets
from acs_hf.integrations.hf_quantizer import quantized_root

ATOL = 1e-5
QCONFIG = QuantConfig(weight_bits=4, act_bits=4)
IMAGE_SIZE = 24
#: keys transformers' config.save_pretrained adds to a timm config.json (its own bookkeeping and
#: TimmWrapperConfig's defaults); save_quantized writes timm's keys only.
TIMM_WRAPPER_KEYS = {"architectures", "do_pooling", "dtype", "initializer_range", "model_type", "transformers_version"}

AUTO_CLASSES = {"timm": "TimmWrapperForImageClassification", "vit": "ViTForImageClassification"}


def collate(features: list[dict]) -> dict[str, torch.Tensor]:
    """The model's arguments only: ``index`` is the views' row number."""
    return {
        "pixel_values": torch.stack([f["pixel_values"] for f in features]),
        "labels": torch.as_tensor([int(f["labels"]) for f in features]),
    }


@pytest.fixture(scope="module")
def digits():
    """64 training digits (``score_dataset``: the eval transform, no augmentation) and a random
    ``test_resnet`` whose BatchNorm statistics are those of these images."""
    torch.manual_seed(0)
    fp = timm.create_model("test_resnet", num_classes=10)
    ds = prepare_datasets(digits_dataset(), fp, image_size=IMAGE_SIZE, max_train_samples=64)
    batch = collate([ds.score_dataset[i] for i in range(len(ds.score_dataset))])
    for bn in fp.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.momentum = None  # a cumulative average: one pass sets the statistics of the batch
    with torch.no_grad():
        fp.train()(batch["pixel_values"])
    return fp.eval(), ds, batch


@pytest.fixture(scope="module")
def timm_checkpoint(tmp_path_factory, digits):
    """A timm student saved as the recipe's ``save_student`` saves it: calibrated on the data, with
    the eval preprocessing and the class names."""
    fp, ds, batch = digits
    student = quantize_model(copy.deepcopy(fp), QCONFIG)
    calibrate_quantizers(student, [batch["pixel_values"]])
    out = tmp_path_factory.mktemp("timm_checkpoint")
    save_quantized(student, out, config=QCONFIG, data_config=ds.data_config, label_names=list(ds.id2label.values()))
    return out


@pytest.fixture(scope="module")
def vit_checkpoint(tmp_path_factory):
    """A transformers ViT student saved as ``save_student`` saves one (its config plus the table)."""
    student, _ = models(family="transformers")
    calibrate_quantizers(student, [torch.randn(8, 3, 16, 16)])
    config = student.config.to_dict()
    config["architectures"] = [type(student).__name__]
    out = tmp_path_factory.mktemp("vit_checkpoint")
    save_quantized(student, out, config=QCONFIG, model_config=config)
    return out


@pytest.fixture(params=["timm", "vit"])
def checkpoint(request):
    """(kind, folder, input size, a float model of the folder's architecture for load_quantized:
    None for timm, which builds its own)."""
    if request.param == "timm":
        return "timm", request.getfixturevalue("timm_checkpoint"), IMAGE_SIZE, None
    folder = request.getfixturevalue("vit_checkpoint")
    config = {k: v for k, v in read_config(folder).items() if k != "quantization_config"}
    return "vit", folder, 16, ViTForImageClassification(ViTConfig(**config))


def read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def assert_same_tensors(expected: Path, found: Path) -> None:
    """Same names, dtypes and values; the metadata records the same layer table and tensors."""
    ta, meta_a = read_weights(expected)
    tb, meta_b = read_weights(found)
    assert sorted(ta) == sorted(tb)
    for name, tensor in ta.items():
        assert tb[name].dtype == tensor.dtype and tb[name].shape == tensor.shape, name
        assert torch.equal(tb[name], tensor), name
    assert sorted(meta_a) == sorted(meta_b)
    for key in ("format", "quant_method", "layers_sha256", "tensors_sha256"):
        assert meta_b[key] == meta_a[key], key
    assert meta_b["checkpoint_id"] == read_config(found)["quantization_config"]["checkpoint_id"]


def assert_same_config(expected: Path, found: Path, kind: str) -> None:
    """The quantization_config block as saved (the same tensors: the same checkpoint id); every key of
    the other config with its value, as written and as transformers reads it back."""
    a, b = read_config(expected), read_config(found)
    assert a["quantization_config"] == b.pop("quantization_config")
    a.pop("quantization_config")
    if kind == "timm":  # everything save_quantized wrote, plus transformers' own keys
        assert {k: b.get(k) for k in a} == a
        assert set(b) - set(a) == TIMM_WRAPPER_KEYS
    else:  # transformers writes the keys that differ from the defaults, and the dtype
        assert {k: a.get(k) for k in b if k != "dtype"} == {k: v for k, v in b.items() if k != "dtype"}
        assert b["dtype"] == "float32"
    assert b["architectures"] == [AUTO_CLASSES[kind]]  # recorded by save_pretrained
    loaded_a, loaded_b = (AutoConfig.from_pretrained(f).to_dict() for f in (expected, found))
    for loaded in (loaded_a, loaded_b):
        for key in ("_name_or_path", "architectures", "dtype", "quantization_config"):
            loaded.pop(key, None)
    assert loaded_a == loaded_b


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(pixel_values=x) if hasattr(model, "config") else model.eval()(x)
    return getattr(out, "logits", out)


def test_save_pretrained_writes_the_save_quantized_folder(checkpoint, tmp_path):
    kind, folder, size, float_model = checkpoint
    model = AutoModelForImageClassification.from_pretrained(folder)
    model.save_pretrained(tmp_path / "resaved")
    assert sorted(p.name for p in (tmp_path / "resaved").iterdir()) == ["config.json", "model.safetensors"]
    assert_same_tensors(folder, tmp_path / "resaved")
    assert_same_config(folder, tmp_path / "resaved", kind)

    x = torch.randn(3, 3, size, size)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "resaved")
    assert type(reloaded) is type(model)
    assert (logits(reloaded, x) - logits(model, x)).abs().max().item() <= ATOL
    # acs_hf's own loader reads the folder too
    reference = load_quantized(tmp_path / "resaved", model=float_model)
    assert (logits(reference, x) - logits(model, x)).abs().max().item() <= ATOL


def test_push_to_hub_uploads_the_saved_folder(timm_checkpoint, tmp_path, monkeypatch):
    """``push_to_hub`` saves through ``save_pretrained``: the upload holds the packed folder."""
    uploads = []

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def create_commit(self, repo_id, operations, **kwargs):
        # read now: push_to_hub deletes its temporary folder after the commit
        files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
        assert all(isinstance(op, CommitOperationAdd) for op in operations)
        uploads.append((repo_id, files))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    model = AutoModelForImageClassification.from_pretrained(timm_checkpoint)
    model.push_to_hub("someone/resnet-w4a4")

    assert len(uploads) == 1 and uploads[0][0] == "someone/resnet-w4a4"
    pushed = tmp_path / "pushed"
    pushed.mkdir()
    for name, data in uploads[0][1].items():
        (pushed / name).write_bytes(data)
    assert {"config.json", "model.safetensors"} <= set(uploads[0][1])
    assert_same_tensors(timm_checkpoint, pushed)
    assert_same_config(timm_checkpoint, pushed, "timm")
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    reloaded = AutoModelForImageClassification.from_pretrained(pushed)
    assert (logits(reloaded, x) - logits(model, x)).abs().max().item() <= ATOL


def step_sizes(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: q.step.detach().clone() for n, q in model.named_modules() if isinstance(q, LSQQuantizer)}


def mean_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    return F.cross_entropy(logits(model, batch["pixel_values"]), batch["labels"]).item()


def train(checkpoint: Path, ds, out: Path, resume: Path | None = None, callback=None) -> Trainer:
    """A plain Trainer, 8 steps on the 64 training digits, a checkpoint every 4 steps."""
    model = AutoModelForImageClassification.from_pretrained(checkpoint)
    args = TrainingArguments(
        output_dir=str(out), max_steps=8, per_device_train_batch_size=32, learning_rate=3e-3,
        save_strategy="steps", save_steps=4, logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=ds.score_dataset,
        data_collator=collate,
        callbacks=[callback] if callback else None,
    )
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return trainer


@pytest.fixture(scope="module")
def qat_run(timm_checkpoint, digits, tmp_path_factory):
    """The trainer of a QAT run continued from the timm checkpoint, and the steps before it."""
    out = tmp_path_factory.mktemp("qat_run")
    steps_before = step_sizes(AutoModelForImageClassification.from_pretrained(timm_checkpoint))
    return train(timm_checkpoint, digits[1], out), out, steps_before


def test_plain_trainer_continues_qat_of_a_loaded_checkpoint(timm_checkpoint, digits, qat_run, tmp_path):
    _, _, fixed = digits
    trainer, out, steps_before = qat_run
    model = trainer.model
    loaded = AutoModelForImageClassification.from_pretrained(timm_checkpoint)
    assert all(q.step.requires_grad for q in quantized_root(loaded).modules() if isinstance(q, LSQQuantizer))
    assert mean_loss(model, fixed) < mean_loss(loaded, fixed) - 0.1  # on the training images, in eval mode
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 8 and sum(logged[-2:]) < sum(logged[:2])
    steps_after = step_sizes(model)
    assert steps_after.keys() == steps_before.keys()
    assert any(not torch.equal(steps_after[n], steps_before[n]) for n in steps_before)
    # the Trainer's checkpoint went through save_pretrained: packed codes that reload to the model
    x = fixed["pixel_values"][:8]
    expected = logits(model, x)
    trainer.save_model(str(tmp_path / "final"))
    for folder in (out / "checkpoint-8", tmp_path / "final"):
        weights, _ = read_weights(folder)
        assert weights["conv1.0.weight"].dtype == torch.uint8 and weights["conv1.0.weight"].dim() == 1
        reloaded = AutoModelForImageClassification.from_pretrained(folder)
        assert (logits(reloaded, x) - expected).abs().max().item() <= ATOL
        assert (logits(load_quantized(folder), x) - expected).abs().max().item() <= ATOL
        reloaded_steps = step_sizes(reloaded)
        assert all(torch.equal(reloaded_steps[n], steps_after[n]) for n in steps_after)


class LogitsAtStart(TrainerCallback):
    """The model's logits on ``x`` when training starts (after a resumed checkpoint is loaded)."""

    def __init__(self, x: torch.Tensor):
        self.x, self.logits = x, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.logits = logits(model, self.x)  # eval mode: training_step sets train mode again


def test_trainer_resumes_from_its_packed_checkpoint(timm_checkpoint, digits, qat_run, tmp_path):
    """``resume_from_checkpoint`` loads the packed folder into the model (its load_state_dict unpacks
    the codes): the run goes on from the quantized model the checkpoint holds."""
    _, ds, fixed = digits
    trainer, out, _ = qat_run
    x = fixed["pixel_values"][:8]
    start = LogitsAtStart(x)
    resumed = train(timm_checkpoint, ds, tmp_path / "resumed", resume=out / "checkpoint-4", callback=start)
    assert resumed.state.global_step == 8
    at_checkpoint = AutoModelForImageClassification.from_pretrained(out / "checkpoint-4")
    assert (start.logits - logits(at_checkpoint, x)).abs().max().item() <= ATOL
    # the first resumed step sees what the uninterrupted run saw at step 5 (the models then part:
    # the packed format keeps the quantized weights, not the float ones between grid points)
    first, again = (
        [e["loss"] for e in t.state.log_history if e.get("step") == 5 and "loss" in e] for t in (trainer, resumed)
    )
    assert len(first) == len(again) == 1 and abs(first[0] - again[0]) <= 1e-4
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "resumed" / "checkpoint-8")
    assert (logits(reloaded, x) - logits(resumed.model, x)).abs().max().item() <= ATOL


def test_save_pretrained_refuses_uninitialised_quantizers(timm_checkpoint, tmp_path):
    broken = AutoModelForImageClassification.from_pretrained(timm_checkpoint)
    quantizer = next(q for q in broken.modules() if isinstance(q, LSQQuantizer))
    quantizer.initialized.fill_(False)
    quantizer.sync_state_from_buffers()
    with pytest.raises(RuntimeError, match=r"save_pretrained\(.*uninitialised.*calibrate_quantizers"):
        broken.save_pretrained(tmp_path / "broken")
    assert not (tmp_path / "broken" / "model.safetensors").exists()


def test_save_pretrained_refuses_shards_and_variants_before_writing(timm_checkpoint, tmp_path):
    """Issue 31: a sharded save (18 files at 50KB) or a variant (model.x.safetensors) wrote a checkpoint
    that neither loader reads; now the save refuses, naming the argument, and writes nothing. A
    max_shard_size the packed checkpoint fits in saves as usual."""
    model = AutoModelForImageClassification.from_pretrained(timm_checkpoint)
    packed = (timm_checkpoint / "model.safetensors").stat().st_size  # the header included: a bound
    small = f"{packed // 4 // 1000}KB"
    with pytest.raises(ValueError, match=rf"save_pretrained\(max_shard_size='{small}'\) would split .* into \d+ "
                                         r"shards.*accepted: a max_shard_size of at least [\d,]+ bytes"):  # fmt: skip
        model.save_pretrained(tmp_path / "sharded", max_shard_size=small)
    with pytest.raises(ValueError, match=r"save_pretrained\(variant='x'\).*model.x.safetensors.*accepted: variant="):
        model.save_pretrained(tmp_path / "variant", variant="x")
    with pytest.raises(ValueError, match=r"variant='x'"):
        model.save_pretrained(tmp_path / "variant", False, None, False, "50GB", "x")  # positionally too
    assert not (tmp_path / "sharded").exists() and not (tmp_path / "variant").exists()
    model.save_pretrained(tmp_path / "fits", max_shard_size=2 * packed)
    assert sorted(p.name for p in (tmp_path / "fits").iterdir()) == ["config.json", "model.safetensors"]
    assert_same_tensors(timm_checkpoint, tmp_path / "fits")
    copied = copy.deepcopy(model)
    assert copied.save_pretrained.model is copied  # a copy checks and saves itself
