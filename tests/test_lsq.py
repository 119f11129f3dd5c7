import math

import pytest
import torch

from acs_hf import LSQQuantizer
from acs_hf.quantization import lsq_fake_quant, quant_range
from acs_hf.quantization.reference import lsq_reference


def close(actual, expected):
    """float32 results against a float64 reference."""
    torch.testing.assert_close(actual.double(), expected.double(), rtol=1e-5, atol=1e-6)


def ref_fake_quant(x, s, bits, signed):
    return lsq_reference(x, s, bits, signed)[0]


def ref_step_grad(x, s, g, bits, signed, per_channel_dim=None):
    return lsq_reference(x, s, bits, signed, grad_output=g, channel_dim=per_channel_dim)[1]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_quant_range(bits, signed):
    qn, qp = quant_range(bits, signed)
    assert qn + qp + 1 == 2**bits
    assert (qn == 0) != signed


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_forward_matches_formula(bits, signed):
    x = torch.randn(1000) * 3
    s = torch.tensor([0.37])
    out = lsq_fake_quant(x, s, bits, signed)
    close(out, ref_fake_quant(x, s, bits, signed))
    qn, qp = quant_range(bits, signed)
    codes = (out / s).round()
    assert codes.min() >= -qn and codes.max() <= qp


@pytest.mark.parametrize("signed", [True, False])
def test_gradients_match_lsq(signed):
    bits = 3
    x = (torch.randn(4, 5, 6) * 2).requires_grad_()
    s = torch.tensor([0.4], requires_grad=True)
    g = torch.randn(4, 5, 6)
    lsq_fake_quant(x, s, bits, signed).backward(g)
    qn, qp = quant_range(bits, signed)
    v = x.detach() / 0.4
    inside = (v >= -qn) & (v <= qp)
    torch.testing.assert_close(x.grad, g * inside)  # straight-through mask
    close(s.grad, ref_step_grad(x.detach(), s.detach(), g, bits, signed))
    assert 0 < inside.float().mean() < 1  # both branches exercised


def test_per_channel_gradient_and_forward():
    bits = 4
    w = torch.randn(6, 3, 3, 3).requires_grad_()
    s = torch.rand(6) * 0.3 + 0.05
    s.requires_grad_()
    g = torch.randn_like(w)
    out = lsq_fake_quant(w, s, bits, True, channel_dim=0)
    out.backward(g)
    close(out, lsq_reference(w, s, bits, True, channel_dim=0)[0])
    close(s.grad, ref_step_grad(w, s, g, bits, True, per_channel_dim=0))


def test_per_channel_on_a_middle_dim():
    x = torch.randn(2, 5, 7, requires_grad=True)
    s = (torch.rand(5) * 0.3 + 0.1).requires_grad_()
    g = torch.randn(2, 5, 7)
    lsq_fake_quant(x, s, 4, True, channel_dim=1).backward(g)
    expected = ref_step_grad(x, s, g, 4, True, per_channel_dim=1)
    close(s.grad, expected)


def test_init_from_per_tensor_and_per_channel():
    w = torch.randn(8, 4, 3, 3)
    q = LSQQuantizer(4, signed=True)
    q.init_from(w)
    assert q.step.item() == pytest.approx(2 * w.abs().mean().item() / math.sqrt(7), rel=1e-6)
    qc = LSQQuantizer(4, signed=True, per_channel=True, num_channels=8)
    qc.init_from(w)
    expected = torch.stack([2 * w[c].abs().mean() / math.sqrt(7) for c in range(8)])
    torch.testing.assert_close(qc.step.data, expected)


def test_signedness_decided_from_data():
    q = LSQQuantizer(4)
    assert q.signed is None
    q.init_from(torch.rand(100))
    assert q.signed is False
    assert q.step.item() == pytest.approx(2 * 0.5 / math.sqrt(15), rel=0.2)
    q2 = LSQQuantizer(4)
    q2.init_from(torch.randn(100))
    assert q2.signed is True


def test_uninitialised_use_raises():
    q = LSQQuantizer(4, name="layer1.0.conv1.input_quantizer")
    with pytest.raises(RuntimeError, match="layer1.0.conv1.input_quantizer.*calibrate_quantizers"):
        q(torch.randn(3))
    q.eval()
    with pytest.raises(RuntimeError, match="initialised"):
        q(torch.randn(3))


def test_bad_bits_rejected():
    with pytest.raises(ValueError, match="bits"):
        LSQQuantizer(9)
    with pytest.raises(ValueError, match="num_channels"):
        LSQQuantizer(4, per_channel=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_math_in_float32(dtype):
    q = LSQQuantizer(4, signed=True)
    x = torch.randn(4096)
    q.init_from(x)
    xl = x.to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(xl)
    assert out.dtype == dtype
    # Reference: the same input, math in float32, rounded to the input dtype once at the end.
    expected = ref_fake_quant(xl.float(), q.step, 4, True).float().to(dtype)
    assert torch.equal(out, expected)


def test_negative_step_is_safe_and_recovers():
    q = LSQQuantizer(4, signed=True)
    x = torch.randn(256)
    q.init_from(x)
    with torch.no_grad():
        q.step.fill_(-0.5)  # what a bad optimizer step can do
    out = q(x)
    assert torch.isfinite(out).all()
    out.pow(2).sum().backward()
    assert torch.isfinite(q.step.grad).all() and q.step.grad.abs().item() > 0


def test_state_dict_round_trip_keeps_calibration():
    q = LSQQuantizer(4)
    q.init_from(torch.rand(50))
    q2 = LSQQuantizer(4)
    q2.load_state_dict(q.state_dict())
    assert q2.is_initialized and q2.signed is False
    x = torch.rand(20)
    assert torch.equal(q(x), q2(x))


@pytest.mark.slow
def test_compiled_kernels_match_eager():
    torch._dynamo.reset()
    x = (torch.randn(3, 4, 5, 6) * 2).requires_grad_()
    outs = []
    for compiled in (False, True):
        s = torch.tensor([0.3], requires_grad=True)
        xi = x.detach().clone().requires_grad_()
        y = lsq_fake_quant(xi, s, 4, True, compiled=compiled)
        y.backward(torch.ones_like(y))
        outs.append((y.detach(), xi.grad, s.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_channels_last_matches_contiguous():
    x = torch.randn(2, 5, 4, 3)
    g = torch.randn(2, 5, 4, 3)
    results = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        xi = x.clone().to(memory_format=fmt).requires_grad_()
        s = torch.tensor([0.3], requires_grad=True)
        y = lsq_fake_quant(xi, s, 4, True)
        y.backward(g)  # a contiguous gradient for a channels_last input: flattened in the same order
        results.append((y.detach(), xi.grad, s.grad))
    assert results[1][0].is_contiguous(memory_format=torch.channels_last)  # layout kept, no copy back
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
    close(results[0][2], ref_step_grad(x, torch.tensor([0.3]), g, 4, True))


def test_first_use_in_inference_mode_then_training():
    """The cached clamp bounds made during a scoring pass must still work in training."""
    from acs_hf.quantization.lsq import _bounds

    _bounds.cache_clear()
    q = LSQQuantizer(3, signed=False)
    x = torch.rand(64)
    q.init_from(x)
    with torch.inference_mode():
        q(x)
    xi = x.clone().requires_grad_()
    q(xi).sum().backward()
    assert xi.grad is not None and q.step.grad is not None


def test_fixed_step_and_observation_methods():
    q = LSQQuantizer(4, learn_step=False)
    assert not q.step.requires_grad
    q.start_observing()
    assert q.observing
    x = torch.randn(10)
    assert torch.equal(q(x), x)  # passes through while observing
    q.stop_observing()
    assert not q.observing and not q.is_initialized
