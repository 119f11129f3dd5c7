"""onnx_accuracy: an exported model's top-1 accuracy and agreement with PyTorch, against the same numbers
computed here from one session run of all images."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from acs_hf import QuantConfig, calibrate_quantizers, export_onnx, onnx_accuracy, onnx_session, quantize_model

pytest.importorskip("onnxruntime")

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
#: Batch sizes of the hand-made batches (a last, short batch as a DataLoader gives).
SIZES = (7, 7, 2)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(a tiny W8A8 model, its export, 16 images, the export's predictions on them, labels right on 10 of them)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    quantize_model(model, QuantConfig(weight_bits=8, act_bits=8, first_last_bits=8))
    images = torch.randn(sum(SIZES), 3, 8, 8)
    calibrate_quantizers(model, [images])
    path = export_onnx(model.eval(), tmp_path_factory.mktemp("onnx") / "tiny.onnx", images[:2])
    session = onnx_session(path)
    predicted = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0].argmax(1)
    labels = predicted.copy()
    labels[10:] = (labels[10:] + 1) % 3  # the last 6 images are labelled with another class
    return model, path, images, predicted, labels


def batches_of(images, labels, tensors: bool = True):
    start = 0
    for n in SIZES:
        x, y = images[start : start + n], labels[start : start + n]
        yield (x, torch.as_tensor(y)) if tensors else (x.numpy(), np.asarray(y))
        start += n


def test_accuracy_is_the_share_of_labels_the_session_predicts(exported):
    _, path, images, _, labels = exported
    for tensors in (True, False):  # torch tensors or numpy arrays
        assert onnx_accuracy(path, batches_of(images, labels, tensors)) == {"accuracy": 10 / 16, "count": 16}
    session = onnx_session(path, threads=1)  # a session of the caller's, with its own options
    assert onnx_accuracy(session, batches_of(images, labels)) == {"accuracy": 10 / 16, "count": 16}


def test_agreement_with_a_callable_reference_and_with_given_predictions(exported):
    model, path, images, predicted, labels = exported
    with torch.no_grad():
        torch_predicted = model(images).argmax(1).numpy()
    result = onnx_accuracy(path, batches_of(images, labels), lambda x: model(x).detach())
    assert result["agreement"] == np.mean(predicted == torch_predicted)
    assert result["reference_accuracy"] == np.mean(torch_predicted == labels)
    flipped = predicted.copy()
    flipped[[0, 1]] = (flipped[[0, 1]] + 1) % 3  # a reference that disagrees on two correctly labelled images
    result = onnx_accuracy(path, batches_of(images, labels), flipped)
    assert result == {"accuracy": 10 / 16, "count": 16, "agreement": 14 / 16, "reference_accuracy": 8 / 16}
    logits = np.eye(3, dtype=np.float32)[flipped]  # logits [N, classes] read as their argmax
    assert onnx_accuracy(path, batches_of(images, labels), torch.from_numpy(logits))["agreement"] == 14 / 16


def test_bad_input_is_named(exported, tmp_path):
    _, path, images, predicted, labels = exported
    with pytest.raises(FileNotFoundError, match="path '.*missing.onnx' is not a file"):
        onnx_accuracy(tmp_path / "missing.onnx", batches_of(images, labels))
    with pytest.raises(ValueError, match=r"batches must be \(pixel_values, labels\) pairs; batch 0 is \{'pixel"):
        onnx_accuracy(path, [{"pixel_values": images, "labels": labels}])
    with pytest.raises(ValueError, match="batch 0 has 16 images but 15 labels"):
        onnx_accuracy(path, [(images, labels[:15])])
    with pytest.raises(ValueError, match="batches held no images"):
        onnx_accuracy(path, [])
    with pytest.raises(ValueError, match=r"predictions \[images\], got an array of shape \(16,\) and dtype float"):
        onnx_accuracy(path, batches_of(images, labels), predicted.astype(np.float32))
    with pytest.raises(ValueError, match="reference has 17 predictions but batches held 16 images"):
        onnx_accuracy(path, batches_of(images, labels), np.append(predicted, 0))
    with pytest.raises(ValueError, match="reference gave 15 predictions for the 16 images of batch 0"):
        onnx_accuracy(path, [(images, labels)], predicted[:15])


def write_folder(root: Path, per_class: int, classes: int = 3) -> None:
    """Noise images whose mean colour depends on the class, in ``root/class_<c>/``."""
    g = np.random.default_rng(len(str(root)))
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(g.normal(60 + 70 * c, 40, (12, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class_{c}" / f"{i}.png")


@pytest.mark.slow
def test_benchmark_deploy_reports_accuracy_on_a_data_set(tmp_path):
    """recipes/benchmark_deploy.py on an image folder: a model with the folder's classes, and each row's
    accuracy equal to the kept .onnx file's on the validation images, computed here."""
    import onnxruntime as ort
    import timm

    from acs_hf.data import load_image_datasets, prepare_datasets

    write_folder(tmp_path / "train", 4)
    write_folder(tmp_path / "val", 5)  # 15 images: all of them under --quick's 16
    spec = importlib.util.spec_from_file_location("benchmark_deploy", RECIPES / "benchmark_deploy.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    folders = ["--train_dir", str(tmp_path / "train"), "--validation_dir", str(tmp_path / "val")]
    report = bench.main(["--quick", "--iterations", "1", "--variants", "fp32", "w8a8_int", *folders,
                         "--keep_models", str(tmp_path)])  # fmt: skip
    raw = load_image_datasets(train_dir=str(tmp_path / "train"), validation_dir=str(tmp_path / "val"))
    ds = prepare_datasets(raw, timm.create_model("test_resnet", num_classes=2), image_size=32)
    x = np.stack([ds.eval_dataset[i]["pixel_values"].numpy() for i in range(len(ds.eval_dataset))])
    labels = np.array([ds.eval_dataset[i]["labels"] for i in range(len(ds.eval_dataset))])
    assert report["agreement_images"].startswith("15 ")
    for name, row in report["results"].items():
        logits = ort.InferenceSession(str(tmp_path / f"{name}.onnx")).run(None, {"pixel_values": x})[0]
        assert logits.shape == (15, 3)  # the folder's classes
        assert row["accuracy"] == np.mean(logits.argmax(1) == labels), name
        assert 0 <= row["torch_accuracy"] <= 1 and row["agreement"]["top1_agreement"] >= 0.75, name


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--eval_images", "0"], "--eval_images must be a positive integer, got 0"),
        (
            ["--train_dir", "a"],
            "--train_dir and --validation_dir go together: got --train_dir 'a' and --validation_dir None",
        ),
        (["--dataset_name", "x", "--train_dir", "a", "--validation_dir", "b"], "give --dataset_name or --train_dir"),
        (["--pretrained_weights", "missing.safetensors"], "--pretrained_weights 'missing.safetensors' is not a file"),
        (["--repeats", "0"], "--repeats must be a positive integer, got 0"),
        (
            ["--families", "resnet18", "--openvino", "seresnet18"],
            "--openvino ['seresnet18'] must be among --families ['resnet18']",
        ),
    ],
)
def test_benchmark_deploy_names_bad_arguments(argv, message, capsys):
    spec = importlib.util.spec_from_file_location("benchmark_deploy", RECIPES / "benchmark_deploy.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err
