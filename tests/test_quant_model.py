import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from torch import nn

from acs_hf import (
    LayerQuantConfig,
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    calibrate_quantizers,
    dequantize_model,
    quantize_model,
)
from acs_hf.quantization import quant_modules, quantizers_initialized
from acs_hf.quantization.reference import lsq_reference


def fake_quant_ref(w, s, bits, signed=True):
    return lsq_reference(w, s, bits, signed)[0].float()


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 6, 3, stride=2, padding=1),
        nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False),  # depthwise
        Conv2dSame(4, 6, 3, stride=2),  # timm dynamic "same" padding
    ],
    ids=["plain", "depthwise", "same"],
)
def test_quant_conv_equals_original_with_quantized_weight(conv):
    x = torch.randn(2, conv.in_channels, 9, 9)
    q = QuantConv2d.from_float(copy.deepcopy(conv), LayerQuantConfig(weight_bits=4))
    q.weight_quantizer.init_from(q.weight)
    ref = copy.deepcopy(conv)
    with torch.no_grad():
        ref.weight.copy_(fake_quant_ref(conv.weight, q.weight_quantizer.step, 4))
    torch.testing.assert_close(q(x), ref(x), rtol=1e-5, atol=1e-5)


def test_from_float_keeps_parameters():
    lin = nn.Linear(5, 3)
    q = QuantLinear.from_float(lin, LayerQuantConfig(4, 4), name="blocks.0.fc1")
    assert q.weight is lin.weight and q.bias is lin.bias
    assert q.input_quantizer is not None and q.input_quantizer.bits == 4
    assert q.weight_quantizer.name == "blocks.0.fc1.weight_quantizer"
    assert q.input_quantizer.name == "blocks.0.fc1.input_quantizer"


def test_quant_linear_matches_formula():
    lin = nn.Linear(5, 3)
    q = QuantLinear.from_float(copy.deepcopy(lin), LayerQuantConfig(3, 4))
    x = torch.rand(7, 5)
    calibrate_quantizers(nn.Sequential(q), [x])
    assert q.input_quantizer.signed is False  # non-negative data -> unsigned
    xq = fake_quant_ref(x, q.input_quantizer.step, 4, signed=False)
    wq = fake_quant_ref(lin.weight, q.weight_quantizer.step, 3)
    torch.testing.assert_close(q(x), F.linear(xq, wq, lin.bias), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "kwargs", "first", "last"),
    [
        ("resnet18", {}, "conv1", "fc"),
        ("mobilenetv2_100", {}, "conv_stem", "classifier"),
        ("vit_tiny_patch16_224", {"img_size": 32}, "patch_embed.proj", "head"),
    ],
)
def test_timm_models_quantize_and_train(name, kwargs, first, last):
    model = timm.create_model(name, num_classes=10, **kwargs)
    n_layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    quantize_model(model, QuantConfig(weight_bits=4, act_bits=4, first_last_bits=8))
    qmods = dict(quant_modules(model))
    assert len(qmods) == n_layers
    assert qmods[first].weight_quantizer.bits == 8 and qmods[last].weight_quantizer.bits == 8
    others = [m for n, m in qmods.items() if n not in (first, last)]
    assert all(m.weight_quantizer.bits == 4 and m.input_quantizer.bits == 4 for m in others)
    if name.startswith("vit"):
        assert isinstance(model.blocks[0].attn.qkv, QuantLinear)
        assert isinstance(model.blocks[0].mlp.fc1, QuantLinear)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    with pytest.raises(RuntimeError, match="calibrate_quantizers"):
        model(x)
    calibrate_quantizers(model, [x])
    assert model.training  # mode restored
    assert quantizers_initialized(model)
    out = model(x)
    out.logsumexp(-1).sum().backward()
    steps = [m.weight_quantizer.step.grad for m in qmods.values()]
    assert all(g is not None and torch.isfinite(g).all() for g in steps)
    assert qmods[first].input_quantizer.step.requires_grad is False  # image input: fixed step


def test_first_last_fp_and_exclude():
    model = timm.create_model("resnet18", num_classes=10)
    quantize_model(model, QuantConfig(first_last_bits=None, exclude=["layer4.*"]))
    names = {n for n, _ in quant_modules(model)}
    assert "conv1" not in names and "fc" not in names
    assert not any(n.startswith("layer4.") for n in names)
    assert "layer1.0.conv1" in names


def test_weights_only_config():
    model = timm.create_model("mobilenetv2_100", num_classes=10)
    quantize_model(model, QuantConfig(weight_bits=2, act_bits=None))
    assert all(m.input_quantizer is None for _, m in quant_modules(model))
    calibrate_quantizers(model, [])  # weights only: no data needed
    assert quantizers_initialized(model)


def test_fallback_first_last_without_pretrained_cfg():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8), nn.Linear(8, 2))
    quantize_model(model, QuantConfig(weight_bits=2, first_last_bits=8))
    assert model[0].weight_quantizer.bits == 8
    assert model[3].weight_quantizer.bits == 2
    assert model[4].weight_quantizer.bits == 8


def test_calibration_uses_mean_abs_of_all_batches():
    lin = nn.Sequential(QuantLinear.from_float(nn.Linear(4, 2), LayerQuantConfig(4, 4)))
    b1, b2 = torch.rand(3, 4), -torch.rand(5, 4)
    calibrate_quantizers(lin, [b1, b2, torch.full((2, 4), 100.0)], num_batches=2)
    iq = lin[0].input_quantizer
    mean_abs = torch.cat([b1, b2]).abs().mean().item()
    assert iq.signed is True
    assert iq.step.item() == pytest.approx(2 * mean_abs / 7**0.5, rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"weight_bits": 9}, "weight_bits"),
        ({"weight_bits": 1}, "weight_bits"),
        ({"act_bits": 0}, "act_bits"),
        ({"first_last_bits": 16}, "first_last_bits"),
        ({"weight_bits": None}, "weight_bits"),
        ({"per_channel_weights": "yes"}, "per_channel_weights"),
        ({"exclude": "fc"}, "exclude"),
    ],
)
def test_quant_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        QuantConfig(**kwargs)


def test_calibrate_errors():
    with pytest.raises(ValueError, match="quantize_model"):
        calibrate_quantizers(nn.Linear(2, 2), [torch.randn(1, 2)])
    model = quantize_model(nn.Sequential(nn.Linear(2, 2)), QuantConfig())
    with pytest.raises(ValueError, match="no data"):
        calibrate_quantizers(model, [])
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, QuantConfig())


@pytest.mark.parametrize(
    "module",
    [nn.Conv2d(3, 4, 3, padding=1, groups=1), Conv2dSame(3, 4, 3, stride=2), nn.Linear(3, 4)],
    ids=["conv", "same", "linear"],
)
def test_dequantize_gives_the_float_layer_back(module):
    model = nn.Sequential(module)
    x = torch.randn(2, 3, 7, 7) if isinstance(module, nn.Conv2d) else torch.randn(2, 3)
    expected = module(x)
    quantize_model(model, QuantConfig(first_last_bits=4))
    assert isinstance(model[0], (QuantConv2d, QuantLinear))
    dequantize_model(model)
    assert type(model[0]) is type(module)  # Conv2dSame stays Conv2dSame
    assert model[0].weight is module.weight  # the same Parameters
    assert torch.equal(model[0](x), expected)
    assert not any(n.endswith("quantizer.step") for n, _ in model.named_parameters())


def test_quantize_model_attaches_nothing_to_the_model():
    model = timm.create_model("test_resnet.r160_in1k", num_classes=4)
    quantize_model(model, QuantConfig())
    assert not hasattr(model, "quant_config")
    first = model.get_submodule("conv1.0")
    assert first.layer_config == LayerQuantConfig(8, 8, learn_input_step=False)
    assert first.input_quantizer.name == "conv1.0.input_quantizer"


@pytest.mark.slow
def test_whole_model_compiles_into_one_graph_with_eager_values():
    """torch.compile over a quantized model traces the LSQ op into the model's graph (no break,
    so each fake quant can fuse with its neighbours) and keeps the eager values and gradients.

    The gradient check uses a net without max pooling: quantized activations tie exactly, and
    where they tie Inductor's max-pool backward may route the gradient to another (equally valid)
    input than eager does."""
    torch.manual_seed(0)
    resnet = quantize_model(timm.create_model("test_resnet", num_classes=4), QuantConfig(4, 4, 8))
    x = torch.randn(4, 3, 32, 32)
    calibrate_quantizers(resnet, [x])
    explained = torch._dynamo.explain(resnet.train())(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip
    model = quantize_model(net, QuantConfig(4, 4, 8))
    x = torch.randn(8, 3, 16, 16)
    calibrate_quantizers(model, [x])
    model.train()
    results = []
    for m in (model, torch.compile(model)):
        model.zero_grad(set_to_none=True)
        out = m(x)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (out_e, grads_e), (out_c, grads_c) = results
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads_e.keys() and sum(".step" in n for n in grads_e) >= 5  # steps learn too
    for name, grad in grads_e.items():
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-4, atol=1e-6, msg=name)
