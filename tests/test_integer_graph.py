"""The integer-graph placement (QuantConfig.integer_graph): which tensors get quantizers, that each is
quantized once, that training, calibration and checkpoints see the new quantizers."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import timm
import torch
from torch import nn

from acs_hf import QuantConfig, calibrate_quantizers, load_quantized, quantize_model, save_quantized
from acs_hf.quantization import LSQQuantizer, dequantize_model, output_quantizers, quant_modules


def resnet_expected(model: nn.Module) -> tuple[set[str], set[str]]:
    """Read off the timm ResNet's blocks by hand: the modules that get output quantizers (the stem's
    act1 before the max pool; per block its last BN, its shortcut's BN and its last activation) and the
    layers whose input is then quantized upstream (each block's first conv and shortcut conv)."""
    sites, shared = {"act1"}, set()
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for i, block in enumerate(getattr(model, stage)):
            name = f"{stage}.{i}"
            last = 3 if hasattr(block, "conv3") else 2
            sites |= {f"{name}.bn{last}", f"{name}.act{last}"}
            shared.add(f"{name}.conv1")
            if block.downsample is not None:
                sites.add(f"{name}.downsample.1")
                shared.add(f"{name}.downsample.0")
    return sites, shared


@pytest.mark.parametrize("arch", ["resnet18", "resnet26"])  # BasicBlock, Bottleneck
def test_resnet_placement(arch):
    model = timm.create_model(arch, num_classes=10)
    sites, shared = resnet_expected(model)
    quantize_model(model, QuantConfig(weight_bits=4, act_bits=4, integer_graph=True))
    assert {name for name, _ in output_quantizers(model)} == sites
    layers = dict(quant_modules(model))
    assert {n for n, m in layers.items() if m.input_quantizer is None} == shared
    # the image (stem conv) and the pooled features (classifier) keep their own 8-bit quantizers
    assert layers["conv1"].input_quantizer.bits == 8 and layers["fc"].input_quantizer.bits == 8
    for name, q in output_quantizers(model):  # signed unless a ReLU makes the tensor non-negative
        assert q.signed == (".bn" in name or "downsample" in name), name


def test_inverted_residual_placement():
    model = timm.create_model("mobilenetv2_050", num_classes=10)
    sites, adds = set(), 0
    for s, stage in enumerate(model.blocks):
        for i, block in enumerate(stage):
            if getattr(block, "has_skip", False):
                adds += 1
                sites |= {f"blocks.{s}.{i}", f"blocks.{s}.{i}.drop_path"}  # the sum and the residual branch
                # the shortcut: the block before, its sum if it has a skip too, else its last BN
                prev = f"blocks.{s}.{i - 1}"
                sites.add(prev if stage[i - 1].has_skip else f"{prev}.bn3")
    assert adds > 0
    quantize_model(model, QuantConfig(weight_bits=4, act_bits=4, integer_graph=True))
    assert {name for name, _ in output_quantizers(model)} == sites
    x = torch.randn(2, 3, 64, 64)
    calibrate_quantizers(model, [x])
    model(x).sum().backward()
    assert all(q.step.grad is not None for _, q in output_quantizers(model))


def test_each_tensor_is_quantized_once_and_block_outputs_are_codes():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10).eval()
    quantize_model(model, QuantConfig(weight_bits=4, act_bits=4, integer_graph=True))
    x = torch.randn(4, 3, 64, 64)
    calibrate_quantizers(model, [x])
    calls: dict[int, int] = {}
    outputs: dict[str, torch.Tensor] = {}
    for q in model.modules():
        if isinstance(q, LSQQuantizer):
            q.register_forward_hook(lambda m, i, o: calls.__setitem__(id(m), calls.get(id(m), 0) + 1))
    model.layer1[1].register_forward_hook(lambda m, i, o: outputs.__setitem__("block", o))
    with torch.no_grad():
        model(x)
    assert set(calls.values()) == {1}  # every quantizer once per forward, none skipped
    activation_quantizers = [q for q in model.modules() if isinstance(q, LSQQuantizer) and not q.per_channel]
    weight_quantizers = {id(m.weight_quantizer) for _, m in quant_modules(model)}
    assert len(calls) == len(activation_quantizers)
    # the block output is act2's codes: integers times its step, within the unsigned 4-bit range
    step = model.layer1[1].act2.output_quantizer.step.detach()
    codes = outputs["block"] / step
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.min() >= 0 and codes.max() <= 15
    assert weight_quantizers <= set(calls)


def test_integer_graph_needs_activation_bits():
    with pytest.raises(ValueError, match="integer_graph=True .* needs act_bits"):
        QuantConfig(act_bits=None, integer_graph=True)
    with pytest.raises(ValueError, match="integer_graph must be a bool, got 'yes'"):
        QuantConfig(integer_graph="yes")


def test_checkpoint_round_trip_and_dequantize(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10).eval()
    quantize_model(model, QuantConfig(weight_bits=2, act_bits=2, integer_graph=True))
    x = torch.randn(3, 3, 64, 64)
    calibrate_quantizers(model, [x])
    save_quantized(model, tmp_path / "ckpt")
    qcfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert qcfg["format_version"] == 3
    assert qcfg["outputs"] == {n: {"bits": 2, "signed": q.signed} for n, q in output_quantizers(model)}
    loaded = load_quantized(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert [n for n, _ in output_quantizers(loaded)] == [n for n, _ in output_quantizers(model)]
    dequantize_model(loaded)
    assert output_quantizers(loaded) == [] and not quant_modules(loaded)
    float_model = timm.create_model("resnet18", num_classes=10).eval()
    float_model.load_state_dict(loaded.state_dict())  # nothing of the quantization is left
    with torch.no_grad():
        assert torch.equal(loaded(x), float_model(x))


def _output_hooks(model: nn.Module) -> int:
    from acs_hf.quantization.output_quant import _quantize_output

    return sum(h is _quantize_output for m in model.modules() for h in m._forward_hooks.values())


def test_dequantize_removes_the_output_hooks_and_a_copy_quantized_again_has_one_each():
    """Issue 37: dequantize_model left one no-op hook per output quantizer (20 on resnet18), and a copy
    dequantized and quantized again carried two."""
    model = quantize_model(timm.create_model("resnet18", num_classes=10), QuantConfig(4, 4, integer_graph=True))
    placed = len(output_quantizers(model))
    assert _output_hooks(model) == placed == 20
    copy_ = dequantize_model(copy.deepcopy(model))
    assert _output_hooks(copy_) == 0 and _output_hooks(model) == placed
    quantize_model(copy_, QuantConfig(4, 4, integer_graph=True))
    assert _output_hooks(copy_) == placed
    assert _output_hooks(dequantize_model(model)) == 0


def test_upstream_still_has_the_module_hook_tables():
    from acs_hf.utils.upstream import check_upstream

    assert not [p for p in check_upstream() if "hooks" in p]


def test_a_model_without_integer_operations_is_warned_about_with_the_reason(caplog):
    """Issue 37: a model where the placement adds nothing (a plain VGG: no addition, product or
    concatenation of computed tensors) is a WARNING that says so."""
    model = timm.create_model("vgg11", num_classes=10)
    with caplog.at_level(logging.WARNING, logger="acs_hf.quantization.integer_graph"):
        quantize_model(model, QuantConfig(weight_bits=4, act_bits=4, integer_graph=True))
    assert output_quantizers(model) == []
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("VGG has no integer operation" in m and "nothing is placed" in m for m in warned), warned


class _Twice(nn.Module):
    """A block called twice: a tensor made in its forward would need one quantizer per call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x)) + x


class _CallsTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = _Twice()
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.block(self.block(self.stem(x))).mean((2, 3)))


def test_an_operation_in_a_module_called_several_times_stays_float_with_the_reason(caplog):
    with caplog.at_level(logging.WARNING, logger="acs_hf.quantization.integer_graph"):
        quantize_model(_CallsTwice(), QuantConfig(weight_bits=4, act_bits=4, integer_graph=True))
    assert "2 of 2 operations stay float" in caplog.text
    assert "made in 'block', a module called several times" in caplog.text


class _Shortcut(nn.Module):
    """A block whose shortcut is ``fn(x)``: the integer graph passes only what keeps the grid."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.fn = fn

    def forward(self, x):
        return self.act(self.bn(self.conv(x)) + self.fn(x))


class _Net(nn.Module):
    def __init__(self, fn, stem_act: nn.Module | None = None) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stem_act = stem_act
        self.block = _Shortcut(fn)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        x = self.stem_act(x) if self.stem_act is not None else torch.relu(x)
        return self.head(self.block(x).mean((2, 3)))


@pytest.mark.parametrize(
    ("fn", "integer"),
    [
        (lambda x: torch.nn.functional.pad(x[:, :, 1:, 1:], (0, 1, 0, 1)), True),  # slices and zeros: on the grid
        (lambda x: torch.nn.functional.pad(x[:, :, 1:, 1:], (0, 1, 0, 1), value=1.0), False),  # 1.0: off the grid
        (lambda x: torch.nn.functional.pad(x[:, :, 1:, 1:], (0, 1, 0, 1), mode="replicate"), False),
        (lambda x: x[:, [3, 1, 2, 0, 4, 5, 6, 7]], False),  # a list index: gathered, not sliced
        (lambda x: x * 1.0, False),
    ],
    ids=["zero-pad", "pad-one", "pad-replicate", "list-index", "scaled"],
)
def test_only_slices_and_zero_pads_pass_a_quantized_tensor_through(fn, integer):
    """On the grid: the shortcut reads the stem's quantizer. Off it: the shortcut's own tensor is
    quantized where ``fn`` makes it, in the block's forward (a tensor site)."""
    model = quantize_model(_Net(fn, stem_act=nn.ReLU()), QuantConfig(weight_bits=4, act_bits=4, integer_graph=True))
    sites = {name for name, _ in output_quantizers(model)}
    assert {"block.bn", "block.act"} <= sites, sites
    assert ("stem_act" in sites) is integer, sites
    assert any(s.startswith("block::") for s in sites) is not integer, sites


def test_a_function_output_read_through_an_identity_is_quantized_where_it_is_made():
    """The stem's ReLU is a function (no module to hook): it is quantized in the model's own forward,
    unsigned, and the identity shortcut and the block's conv read that quantizer."""
    model = quantize_model(_Net(nn.Identity()), QuantConfig(weight_bits=4, act_bits=4, integer_graph=True))
    quantizers = dict(output_quantizers(model))
    assert set(quantizers) == {"block.bn", "::relu", "block.act"}
    assert quantizers["::relu"].signed is False and quantizers["block.bn"].signed is True
    assert dict(quant_modules(model))["block.conv"].input_quantizer is None
