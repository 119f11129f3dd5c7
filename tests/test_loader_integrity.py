"""Every loader checks what it loads (issue 21): ``load_quantized``, transformers' ``from_pretrained``
and ``pipeline`` refuse an edited architecture or ``model_args``, flipped bytes in any tensor and a
missing tensor, naming the file and the value. Tiny timm models, offline."""

import json
import re
import shutil
import struct

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageClassification, pipeline

import acs_hf  # noqa: F401  (registers the quantizer with transformers)
from acs_hf import QuantConfig, calibrate_quantizers, load_quantized, quantize_model, save_quantized


def _save(folder, name):
    model = timm.create_model(name, num_classes=10)
    quantize_model(model, QuantConfig())
    calibrate_quantizers(model, [torch.randn(2, 3, 32, 32)])
    save_quantized(model.eval(), folder)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("test_resnet")
    return folder, _save(folder, "test_resnet")


@pytest.fixture
def folder(saved, tmp_path):
    return shutil.copytree(saved[0], tmp_path / "ckpt")


def _edit_config(folder, edit):
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def _rewrite(folder, edit_tensors, drop_meta=()):
    """Save the weights file again with ``edit_tensors`` applied and ``drop_meta`` keys removed."""
    weights = folder / "model.safetensors"
    with safe_open(weights, framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k not in drop_meta}
    tensors = load_file(weights)
    edit_tensors(tensors)
    save_file(tensors, weights, metadata=meta)


def _flip_byte(weights, tensor):
    """Flip the lowest bit of the first byte of ``tensor``'s data in the file, in place."""
    data = bytearray(weights.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    begin = json.loads(data[8 : 8 + header_len])[tensor]["data_offsets"][0]
    data[8 + header_len + begin] ^= 1
    weights.write_bytes(bytes(data))


def _loaders(folder):
    return {
        "from_pretrained": lambda: AutoModelForImageClassification.from_pretrained(folder),
        "load_quantized": lambda: load_quantized(folder),
    }


def test_edited_architecture_refused_by_every_loader(tmp_path):
    """resnet18 saved, config.json edited to resnet34: not a model with random, float extra blocks."""
    _save(tmp_path, "resnet18")
    _edit_config(tmp_path, lambda cfg: cfg.update(architecture="resnet34"))
    message = "architecture is 'resnet34', saved 'resnet18'"
    for load in [lambda: pipeline("image-classification", model=str(tmp_path)), *_loaders(tmp_path).values()]:
        with pytest.raises(ValueError, match=message):
            load()


def test_edited_model_args_value_refused(folder):
    """An allowed key with another value (global_pool) changes the model without changing a tensor."""
    _edit_config(folder, lambda cfg: cfg["model_args"].update(global_pool="max"))
    for load in _loaders(folder).values():
        with pytest.raises(ValueError, match=r"model_args is \{.*'max'.*\}, saved \{.*'avg'.*\}"):
            load()


@pytest.mark.parametrize("kind", ["packed codes", "BN running value", "step size"])
def test_flipped_byte_refused_by_both_loaders(folder, kind):
    layer = next(iter(json.loads((folder / "config.json").read_text())["quantization_config"]["layers"]))
    tensor = {"packed codes": f"{layer}.weight", "BN running value": "bn1.running_var"}.get(
        kind, f"{layer}.weight_quantizer.step"
    )
    weights = folder / "model.safetensors"
    _flip_byte(weights, tensor)
    for loader, load in _loaders(folder).items():
        with pytest.raises(ValueError, match=f"{loader}.*{re.escape(str(weights))}: tensor '{re.escape(tensor)}'"):
            load()


@pytest.mark.parametrize("key", ["checkpoint_path", "pretrained_cfg_overlay"])
def test_model_args_outside_the_architecture_refused_by_transformers(folder, key):
    """Not a bare FileNotFoundError from timm reading a file of config.json's choosing."""
    _edit_config(folder, lambda cfg: cfg["model_args"].update({key: str(folder / "elsewhere.pth")}))
    message = f"model_args has keys \\['{key}'\\] that are not architecture settings; accepted: .*'img_size'"
    with pytest.raises(ValueError, match=message):
        AutoModelForImageClassification.from_pretrained(folder)
    with pytest.raises(ValueError, match=message):
        pipeline("image-classification", model=str(folder))


@pytest.mark.parametrize("digests", [True, False], ids=["with_digests", "older_save"])
def test_missing_tensor_is_an_error_naming_it(folder, digests):
    """A weights file without a BatchNorm statistic: an error, not a warning and a default value."""
    drop = () if digests else ("tensors_sha256",)
    _rewrite(folder, lambda tensors: tensors.pop("bn1.running_mean"), drop_meta=drop)
    for load in _loaders(folder).values():
        with pytest.raises(ValueError, match=r"model\.safetensors.*\['bn1\.running_mean'\]"):
            load()


def test_older_save_without_digests_loads_unchecked(folder, saved, caplog):
    """Format 2 files saved before the digests were recorded still load, with a log line."""
    _rewrite(folder, lambda tensors: None, drop_meta=("architecture_config", "tensors_sha256"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = saved[1](x)
        with caplog.at_level("INFO", logger="acs_hf.quantization.integrity"):
            assert torch.equal(load_quantized(folder)(x), ref)
            assert (AutoModelForImageClassification.from_pretrained(folder)(x).logits - ref).abs().max() <= 1e-5
    assert caplog.text.count("no architecture or tensor digests") == 2
