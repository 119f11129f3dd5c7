"""The CIFAR ResNet family (acs_hf.families), starting from a local weights file (--pretrained_weights), and
the integer-graph export of option-A blocks. Checkpoints in the public format are written by the tests."""

import hashlib
import json
import logging
import re
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import ModelCard

import acs_hf
import acs_hf.run.recipe
from acs_hf import load_quantized, load_weights
from acs_hf.families import ShortcutA
from acs_hf.run.arguments import ModelArguments

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
DEMO = str(RECIPES / "configs" / "digits_demo.yaml")
DEPTHS = {20: 3, 32: 5, 44: 7, 56: 9}


def _expected_parameters(n: int, num_classes: int) -> int:
    """He et al.'s CIFAR ResNet with option-A shortcuts, counted by hand: 3x3 convolutions without bias,
    BatchNorm (weight and bias) after each, a linear classifier."""
    conv = 3 * 16 * 9 + 2 * n * 16 * 16 * 9  # stem, stage 1
    conv += 16 * 32 * 9 + (2 * n - 1) * 32 * 32 * 9  # stage 2
    conv += 32 * 64 * 9 + (2 * n - 1) * 64 * 64 * 9  # stage 3
    bn = 2 * (16 + 2 * n * (16 + 32 + 64))
    return conv + bn + 64 * num_classes + num_classes


@pytest.mark.parametrize("depth", DEPTHS)
def test_family_is_registered_with_its_depth_and_parameters(depth):
    model = timm.create_model(f"cifar_resnet{depth}", num_classes=100)
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(layers) == depth  # 6n + 2 weight layers
    assert sum(p.numel() for p in model.parameters()) == _expected_parameters(DEPTHS[depth], 100)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    cfg = model.pretrained_cfg
    assert (cfg["input_size"], cfg["crop_pct"], cfg["classifier"], cfg["first_conv"]) == (
        (3, 32, 32),
        1.0,
        "linear",
        "conv1",
    )
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)


def test_family_registered_whichever_is_imported_first():
    import subprocess
    import sys

    for first, second in (("timm", "acs_hf"), ("acs_hf", "timm")):
        code = f"import {first}, {second}, timm; print(timm.is_model('cifar_resnet56'))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert out.strip() == "True", (first, second)


def test_option_a_shortcut_subsamples_and_pads_zero_channels():
    x = torch.randn(2, 16, 8, 8)
    out = ShortcutA(16, 32)(x)
    expected = torch.zeros(2, 32, 4, 4)
    expected[:, 8:24] = x[:, :, 0::2, 0::2]  # 8 zero channels on each side
    assert torch.equal(out, expected)
    model = timm.create_model("cifar_resnet20", shortcut="B")
    assert isinstance(model.layer2[0].shortcut[0], torch.nn.Conv2d)
    assert model.layer2[0].shortcut[0].stride == (2, 2)
    with pytest.raises(ValueError, match="shortcut='C' is not one of 'A'"):
        timm.create_model("cifar_resnet20", shortcut="C")


def _public_checkpoint(model: torch.nn.Module, path: Path) -> Path:
    """The format of the public CIFAR ResNet weights: DataParallel keys, no BatchNorm step counters."""
    state = {f"module.{k}": v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": state, "best_prec1": 91.0}, path)
    return path


def test_public_format_checkpoint_loads_without_a_key_map(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("cifar_resnet20").eval()
    for m in source.modules():  # statistics a fresh model does not have
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    path = _public_checkpoint(source, tmp_path / "resnet20.th")
    torch.manual_seed(1)
    model = load_weights(timm.create_model("cifar_resnet20"), path).eval()
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(model(x), source(x))


def test_safetensors_file_loads(tmp_path):
    from safetensors.torch import save_file

    source = timm.create_model("cifar_resnet20", num_classes=7)
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    model = load_weights(timm.create_model("cifar_resnet20", num_classes=7), tmp_path / "w.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items())


def test_mismatched_weights_are_named(tmp_path):
    deeper = _public_checkpoint(timm.create_model("cifar_resnet32"), tmp_path / "resnet32.th")
    with pytest.raises(ValueError, match=r"does not fit CifarResNet: unexpected: layer1\.3\.bn1\.bias"):
        load_weights(timm.create_model("cifar_resnet20"), deeper)
    option_b = _public_checkpoint(timm.create_model("cifar_resnet20", shortcut="B"), tmp_path / "b.th")
    with pytest.raises(ValueError, match=r"unexpected: layer2\.0\.shortcut\.0\.weight"):
        load_weights(timm.create_model("cifar_resnet20"), option_b)
    with pytest.raises(ValueError, match=r"missing: layer2\.0\.shortcut\.0\.weight"):
        load_weights(timm.create_model("cifar_resnet20", shortcut="B"), _public_checkpoint(
            timm.create_model("cifar_resnet20"), tmp_path / "a.th"))  # fmt: skip
    ten = _public_checkpoint(timm.create_model("cifar_resnet20"), tmp_path / "ten.th")
    with pytest.raises(ValueError, match=r"mis-shaped: linear\.bias \[10\] in the file, \[100\] in the model.*"
                                         r"the classifier linear must have one output per class"):  # fmt: skip
        load_weights(timm.create_model("cifar_resnet20", num_classes=100), ten)
    torch.save(timm.create_model("cifar_resnet20"), tmp_path / "pickled.pt")  # a whole model: code, not weights
    with pytest.raises(ValueError, match="cannot be read as weights"):
        load_weights(timm.create_model("cifar_resnet20"), tmp_path / "pickled.pt")
    torch.save({"state_dict": {"conv1.weight": "not a tensor"}}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match=r"holds non-tensor entries \['conv1.weight'\]"):
        load_weights(timm.create_model("cifar_resnet20"), tmp_path / "odd.pt")


def test_model_arguments_check_the_weights_options(tmp_path):
    weights = tmp_path / "w.th"
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match="pretrained=True and pretrained_weights=.* give one of them"):
        ModelArguments(model_name="cifar_resnet20", pretrained=True, pretrained_weights=str(weights))
    with pytest.raises(ValueError, match="teacher_pretrained_weights=.* needs --teacher_model_name"):
        ModelArguments(model_name="cifar_resnet20", teacher_pretrained_weights=str(weights))
    with pytest.raises(ValueError, match="pretrained_weights='no/such.th' is not a file"):
        ModelArguments(model_name="cifar_resnet20", pretrained_weights="no/such.th")


@pytest.fixture
def no_data(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the bad weights file was not caught before loading data")

    monkeypatch.setattr(acs_hf.run.recipe, "load_image_datasets", refuse)


def test_recipe_refuses_mismatched_weights_before_loading_data(recipe, tmp_path, no_data):
    deeper = _public_checkpoint(timm.create_model("cifar_resnet32"), tmp_path / "resnet32.th")
    with pytest.raises(ValueError, match=r"pretrained_weights=.*resnet32\.th' does not fit CifarResNet: unexpected"):
        recipe.main([DEMO, "--output_dir", str(tmp_path / "out"), "--model_name", "cifar_resnet20",
                     "--pretrained_weights", str(deeper)])  # fmt: skip
    with pytest.raises(ValueError, match=r"teacher_pretrained_weights=.*resnet32\.th' does not fit CifarResNet"):
        recipe.main([DEMO, "--output_dir", str(tmp_path / "out"), "--model_name", "cifar_resnet20",
                     "--teacher_model_name", "cifar_resnet56",
                     "--teacher_pretrained_weights", str(deeper)])  # fmt: skip


@pytest.mark.slow
def test_recipe_starts_from_the_weights_file_and_the_card_names_it(recipe, tmp_path, monkeypatch):
    torch.manual_seed(0)
    start = timm.create_model("cifar_resnet20")  # digits has 10 classes, as CIFAR-10
    path = _public_checkpoint(start, tmp_path / "start.th")
    seen = {}
    quantize = acs_hf.run.recipe.quantize_model

    def keep(model, config):  # the FP model the student is made from
        seen["fp"] = {k: v.clone() for k, v in model.state_dict().items()}
        return quantize(model, config)

    monkeypatch.setattr(acs_hf.run.recipe, "quantize_model", keep)
    out = tmp_path / "out"
    summary = recipe.main([DEMO, "--output_dir", str(out), "--model_name", "cifar_resnet20", "--pretrained_weights",
                           str(path), "--max_train_samples", "64", "--max_eval_samples", "32",
                           "--num_train_epochs", "1", "--fraction", "0.25", "--fp_warmup_epochs", "0",
                           "--save_strategy", "epoch"])  # fmt: skip
    for k, v in start.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(seen["fp"][k], v), k
    card = ModelCard.load(out / "README.md")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    assert f"the weights file `start.th (sha256 {digest})`" in card.text.replace("\n", " ")
    assert str(tmp_path) not in card.text  # never a local path on a card
    model = load_quantized(out)
    assert type(model).__name__ == "CifarResNet"
    results = json.loads((out / "all_results.json").read_text())
    assert 0 <= results["eval_accuracy"] <= 1 and summary["metrics"]["fp_eval_accuracy"] is not None
    # The checkpoint records the starting weights; a resume without them (a random teacher) is refused early.
    (checkpoint,) = out.glob("checkpoint-*")
    assert json.loads((checkpoint / "acs_state.json").read_text())["start"]["pretrained_weights"] == digest
    monkeypatch.setattr(acs_hf.run.recipe, "load_image_datasets", lambda *a, **k: pytest.fail("data loaded"))
    with pytest.raises(ValueError, match=f"started from other weights .*pretrained_weights: '{digest}' in the"):
        recipe.main([DEMO, "--output_dir", str(tmp_path / "resumed"), "--model_name", "cifar_resnet20",
                     "--resume_from_checkpoint", str(checkpoint), "--fp_warmup_epochs", "0"])  # fmt: skip


def _integer_graph_student(shortcut: str):
    from acs_hf import QuantConfig, calibrate_quantizers, quantize_model

    torch.manual_seed(0)
    model = timm.create_model("cifar_resnet20", shortcut=shortcut).eval()
    for m in model.modules():  # BatchNorm statistics of a trained network, not a fresh one's identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
    student = quantize_model(model, QuantConfig(weight_bits=8, act_bits=8, integer_graph=True))
    calibrate_quantizers(student, [torch.randn(32, 3, 32, 32)])
    return student.eval()


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_integer_graph_export_runs_every_convolution_and_addition_in_integer_kernels(tmp_path, shortcut, caplog):
    pytest.importorskip("onnxruntime")
    from acs_hf import export_onnx, integer_kernel_counts, onnx_session

    student = _integer_graph_student(shortcut)
    with caplog.at_level(logging.WARNING, logger="acs_hf"):
        path = export_onnx(student, tmp_path / "model.onnx", input_size=(3, 32, 32))
    assert "stay float" not in caplog.text
    counts = integer_kernel_counts(path)
    convs = 19 + (2 if shortcut == "B" else 0)  # 6n + 1 convolutions, plus B's two 1x1 shortcut convolutions
    assert counts["conv"] == {"integer": convs, "float": 0}
    assert counts["add"] == {"integer": 9, "float": 0}  # one residual addition per block (3 stages x 3 blocks)
    x = torch.randn(8, 3, 32, 32)
    session = onnx_session(path)
    logits = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        expected = student(x).numpy()
    # Not bit-exact once BatchNorm is folded into int32 biases (docs/deploy.md): a tie in rounding takes the
    # neighbouring code, which compounds over 19 layers; measured up to 3% of the logit range at W8A8.
    assert abs(logits - expected).max() <= 0.05 * (expected.max() - expected.min())
    assert (logits.argmax(1) == expected.argmax(1)).sum() >= 7


def test_option_a_shortcut_reads_the_block_input_quantizer():
    from acs_hf.quantization import output_quantizers

    student = _integer_graph_student("A")
    sites = {name for name, _ in output_quantizers(student)}
    # The stem's ReLU and each block's sum (at act2) and its second BatchNorm: 1 + 9 + 9, no shortcut of its own.
    assert sites == {"act1"} | {f"layer{s}.{b}.{m}" for s in (1, 2, 3) for b in range(3) for m in ("act2", "bn2")}
    # The shortcut's output is on the grid of the quantizer before it: subsampled codes and zeros.
    block = student.layer2[0]
    x = torch.randn(2, 3, 32, 32)
    captured = {}
    block.shortcut.register_forward_hook(lambda m, a, out: captured.update(out=out))
    with torch.no_grad():
        student(x)
    step = student.layer1[2].act2.output_quantizer.step.detach()
    codes = captured["out"] / step
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert torch.equal(captured["out"][:, :8], torch.zeros_like(captured["out"][:, :8]))


def test_features_only_gives_the_stem_and_the_three_stages():
    model = timm.create_model("cifar_resnet20", features_only=True)
    shapes = [tuple(f.shape) for f in model(torch.randn(1, 3, 32, 32))]
    assert shapes == [(1, 16, 32, 32), (1, 16, 32, 32), (1, 32, 16, 16), (1, 64, 8, 8)]
    assert model.feature_info.reduction() == [1, 1, 2, 4]


def test_pretrained_without_downloadable_weights_is_refused_at_once():
    with pytest.raises(ValueError, match="'cifar_resnet20' has no pretrained weights .* --pretrained_weights"):
        ModelArguments(model_name="cifar_resnet20", pretrained=True).check_start_weights()
    teacher_only = ModelArguments(model_name="cifar_resnet20", teacher_model_name="cifar_resnet56")
    with pytest.raises(ValueError, match="'cifar_resnet56' has no pretrained weights .* --teacher_pretrained_weights"):
        teacher_only.check_start_weights()


def test_a_resume_from_other_weights_is_refused(tmp_path):
    from transformers import TrainingArguments

    from acs_hf.run.resume_checks import check_resume_start

    first = _public_checkpoint(timm.create_model("cifar_resnet20"), tmp_path / "first.th")
    other = _public_checkpoint(timm.create_model("cifar_resnet20"), tmp_path / "other.th")
    recorded = ModelArguments(model_name="cifar_resnet20", pretrained_weights=str(first)).start_settings()
    ckpt = tmp_path / "run" / "checkpoint-4"
    ckpt.mkdir(parents=True)
    (ckpt / "acs_state.json").write_text(json.dumps({"start": recorded}))
    args = TrainingArguments(output_dir=str(tmp_path / "new"), resume_from_checkpoint=str(ckpt), use_cpu=True)
    check_resume_start(args, recorded)  # the same file, under any path: accepted

    first_digest, other_digest = (hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in (first, other))
    for changed, named in (
        (
            dict(pretrained_weights=str(other)),
            f"pretrained_weights: '{first_digest}' in the checkpoint, '{other_digest}'",
        ),
        ({}, f"pretrained_weights: '{first_digest}' in the checkpoint, None on the command line"),
    ):
        now = ModelArguments(model_name="cifar_resnet20", **changed).start_settings()
        with pytest.raises(ValueError, match=re.escape(named)):
            check_resume_start(args, now)


def test_a_teacher_for_other_classes_fails_before_the_warmup(recipe, tmp_path, monkeypatch):
    seven = _public_checkpoint(timm.create_model("cifar_resnet56", num_classes=7), tmp_path / "seven.th")

    def no_warmup(*args, **kwargs):
        raise AssertionError("the teacher's class count was not checked before the FP warm-up")

    monkeypatch.setattr(acs_hf.run.recipe, "_warmup", no_warmup)
    with pytest.raises(ValueError, match=r"teacher_pretrained_weights=.*mis-shaped: linear\.bias \[7\] in the file"):
        recipe.main([DEMO, "--output_dir", str(tmp_path / "out"), "--model_name", "cifar_resnet20",
                     "--teacher_model_name", "cifar_resnet56", "--teacher_pretrained_weights", str(seven),
                     "--max_train_samples", "64", "--max_eval_samples", "32"])  # fmt: skip
