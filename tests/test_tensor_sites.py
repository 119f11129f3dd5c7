"""Integer-graph placement on tensors of the traced graph (issue 38): a residual written as code, a
module called several times, a squeeze-excitation product, a concatenation and a ViT's additions and
matmuls all get quantizers, export to ONNX Runtime's integer kernels, and survive a checkpoint."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import timm
import torch
from torch import nn

from acs_hf import QuantConfig, calibrate_quantizers, load_quantized, quantize_model, save_quantized
from acs_hf.quantization import dequantize_model, output_quantizers, quant_modules

pytest.importorskip("onnxruntime")

from acs_hf import export_onnx, integer_kernel_counts, onnx_session  # noqa: E402

W8A8 = QuantConfig(weight_bits=8, act_bits=8, integer_graph=True)


class FunctionalBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + x)`` with one ReLU module called twice (torchvision's way)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


class SEBlock(nn.Module):
    """A residual block with a squeeze-excitation gate: ``x * sigmoid(fc(mean(x)))`` before the sum."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.reduce, self.expand = nn.Conv2d(c, c // 2, 1), nn.Conv2d(c // 2, c, 1)

    def forward(self, x):
        y = self.bn(self.conv(x))
        gate = torch.sigmoid(self.expand(torch.relu(self.reduce(y.mean((2, 3), keepdim=True)))))
        return torch.relu(y * gate + x)


class ConcatBlock(nn.Module):
    """Two branches concatenated (DenseNet / Inception's way)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.b, self.bn_b = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.cat([self.bn_a(self.a(x)), self.bn_b(self.b(x))], dim=1)


class Net(nn.Module):
    def __init__(self, block: nn.Module, c: int = 8, out: int = 8) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.block = block
        self.head = nn.Linear(out, 10)

    def forward(self, x):
        return self.head(self.block(torch.relu(self.bn(self.stem(x)))).mean((2, 3)))


def _calibrated(model: nn.Module, size=(3, 16, 16), seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    for m in model.modules():  # BatchNorm statistics that are not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5), m.weight.data.uniform_(0.5, 1.5)
    model = quantize_model(model.eval(), W8A8)
    x = torch.randn(16, *size)
    calibrate_quantizers(model, [x])
    return model.eval(), x


def _export_and_check(model: nn.Module, x: torch.Tensor, tmp_path) -> dict:
    """Export, check ONNX Runtime agrees with PyTorch, and return the kernel counts."""
    path = export_onnx(model, tmp_path / "m.onnx", input_size=tuple(x.shape[1:]))
    session = onnx_session(path)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    # integer kernels round BatchNorm into int32 biases: a few percent of the logits' range, same top-1
    assert np.abs(got - want).max() <= 0.1 * np.abs(want).max() + 1e-3
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.85
    return integer_kernel_counts(path)


def test_a_residual_written_as_code_with_a_reused_relu_runs_in_integer_kernels(tmp_path):
    model, x = _calibrated(Net(FunctionalBlock(8)))
    sites = dict(output_quantizers(model))
    # by hand: the stem's ReLU (a function in Net.forward; the block's conv1 and its sum read it), the
    # block's bn2 (signed) and its second ReLU call (unsigned: the sum, after the ReLU)
    assert set(sites) == {"::relu", "block.bn2", "block::relu_1"}
    assert [sites[s].signed for s in ("::relu", "block.bn2", "block::relu_1")] == [False, True, False]
    assert dict(quant_modules(model))["block.conv1"].input_quantizer is None  # reads ::relu's codes
    kernels = _export_and_check(model, x, tmp_path)
    assert kernels["conv"] == {"integer": 3, "float": 0} and kernels["add"] == {"integer": 1, "float": 0}


def test_a_squeeze_excitation_product_and_its_sum_run_in_integer_kernels(tmp_path):
    model, x = _calibrated(Net(SEBlock(8)))
    sites = dict(output_quantizers(model))
    # the product's inputs (bn, the gate) and output; the sum's; the gate's input, so that ``expand`` and
    # the sigmoid run on codes too
    assert set(sites) == {"::relu", "block.bn", "block::sigmoid", "block::mul", "block::relu_1", "block.expand"}
    assert sites["block::sigmoid"].signed is False and sites["block::mul"].signed is True
    kernels = _export_and_check(model, x, tmp_path)
    assert kernels["mul"] == {"integer": 1, "float": 0} and kernels["add"] == {"integer": 1, "float": 0}
    # stem, conv, and the gate's two (the reducing conv keeps its bias for ONNX Runtime to round to int32)
    assert kernels["conv"] == {"integer": 4, "float": 0}


def test_a_concatenation_runs_in_an_integer_kernel(tmp_path):
    model, x = _calibrated(Net(ConcatBlock(8), out=16))
    sites = dict(output_quantizers(model))
    assert {"block.bn_a", "block.bn_b", "block"} <= set(sites)  # both inputs, and the block's output
    kernels = _export_and_check(model, x, tmp_path)
    assert kernels["concat"] == {"integer": 1, "float": 0}


def test_a_vit_runs_its_additions_linears_and_attention_matmuls_in_integer_kernels(tmp_path):
    depth = 2
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8, depth=depth)
    model, x = _calibrated(vit, size=(3, 32, 32))
    sites = set(dict(output_quantizers(model)))
    for i in range(depth):  # q * scale, and v, are tensors of the attention's own forward
        assert {f"blocks.{i}.attn::mul", f"blocks.{i}::add"} <= sites, sites
    assert all(not m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))
    kernels = _export_and_check(model, x, tmp_path)
    # per block: qkv, proj, fc1, fc2 and the two attention matmuls; and the head
    assert kernels["matmul"] == {"integer": 6 * depth + 1, "float": 0}
    assert kernels["add"] == {"integer": 2 * depth, "float": 0}


def _tiny_vit() -> nn.Module:
    return timm.create_model("test_vit", num_classes=10, img_size=32, patch_size=8)  # timm's tiny test ViT


def test_tensor_sites_survive_a_checkpoint_a_copy_and_dequantize(tmp_path):
    model, x = _calibrated(_tiny_vit(), size=(3, 32, 32))
    save_quantized(model, tmp_path / "ckpt")
    qcfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert qcfg["format_version"] == 4 and {"blocks.0::add", "blocks.5.attn::mul"} <= set(qcfg["outputs"])
    loaded = load_quantized(tmp_path / "ckpt")
    assert [n for n, _ in output_quantizers(loaded)] == [n for n, _ in output_quantizers(model)]
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        assert torch.equal(copy.deepcopy(loaded)(x), model(x))
    dequantize_model(loaded)
    assert output_quantizers(loaded) == [] and "forward" not in vars(loaded.blocks[0])
    float_model = _tiny_vit().eval()
    float_model.load_state_dict(loaded.state_dict())  # nothing of the quantization is left
    with torch.no_grad():
        assert torch.allclose(loaded(x), float_model(x), atol=1e-5)  # unfused attention: same up to rounding


def test_a_forward_that_branches_on_training_keeps_both_branches():
    class Dropping(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            y = torch.nn.functional.dropout(self.conv(x), 0.5, training=self.training)
            return torch.relu(y + x)

    model, x = _calibrated(Net(Dropping()))
    assert "block::relu" in dict(output_quantizers(model))
    with torch.no_grad():
        model.train()
        torch.manual_seed(0)
        trained = model(x)
        model.eval()
        assert torch.equal(model(x), model(x)) and not torch.equal(trained, model(x))  # dropout only in training


def test_a_site_the_forward_does_not_have_is_refused():
    from acs_hf.quantization import OutputQuantConfig, quantize_outputs

    with pytest.raises(ValueError, match="'block::nope'.*has no such node"):
        quantize_outputs(Net(SEBlock(8)), {"block::nope": OutputQuantConfig(bits=8, signed=True)})


class DefaultShortcut(nn.Module):
    """A forward whose shortcut defaults to None: its own trace must take None as its caller passes it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x, shortcut=None):
        shortcut = x if shortcut is None else shortcut
        return torch.relu(self.bn(self.conv(x)) + shortcut)


def test_a_default_argument_is_traced_as_the_caller_passes_it():
    model, x = _calibrated(Net(DefaultShortcut()))
    assert {"block.bn", "block::relu"} <= set(dict(output_quantizers(model)))
    with torch.no_grad():
        model(x)  # the generated forward takes shortcut=None as the class's forward does


def test_tensor_sites_survive_pickling(tmp_path):
    """torch.save of the whole model: the generated forward is made again on the first call."""
    model, x = _calibrated(Net(SEBlock(8)))
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert {n for n, _ in output_quantizers(loaded)} == {n for n, _ in output_quantizers(model)}


def test_a_failed_placement_leaves_the_model_as_it_was():
    from acs_hf.quantization import OutputQuantConfig, quantize_outputs

    model = Net(SEBlock(8))
    config = OutputQuantConfig(bits=8, signed=True)
    with pytest.raises(ValueError, match="has no such node"):
        quantize_outputs(model, {"block.bn": config, "::relu": config, "block::nope": config})
    assert output_quantizers(model) == [] and "forward" not in vars(model) and not model.block.bn._forward_hooks


def test_an_in_place_operation_whose_result_is_dropped_stays_float(caplog):
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            out = self.conv(x)
            out.add_(x)
            return torch.relu(out)

    with caplog.at_level("WARNING", logger="acs_hf.quantization.integer_graph"):
        model = quantize_model(Net(InPlace()), W8A8)
    assert "its result is not read (in place)" in caplog.text
    assert not any(n.startswith("block") for n, _ in output_quantizers(model))


def test_dequantize_gives_a_vit_its_fused_attention_back():
    model = quantize_model(_tiny_vit(), W8A8)
    attention = [m for m in model.modules() if hasattr(m, "fused_attn")]
    assert attention and not any(m.fused_attn for m in attention)
    dequantize_model(model)
    assert all(m.fused_attn for m in attention) == timm.layers.use_fused_attn()
