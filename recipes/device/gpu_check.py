"""Correctness of the LSQ op on a CUDA device before timing it: eager and compiled kernels, bf16,
channels_last, against a float64 CPU reference; then a whole quantized model under torch.compile
(the LSQ op traced into the model's graph) against the same model in eager mode, whose op the first
part checked. Prints one line per case and exits 1 on a miss.

Elements whose x/s lies within 1e-5 of a rounding tie (k + 0.5) are left out of the comparison (and
counted): there, a division that differs in the last bit (Triton's fp32 division is not IEEE-exact)
legitimately picks the other code. Their gradient is zeroed so the step gradient compares exactly.
"""

import sys

import timm
import torch

from acs_hf import QuantConfig, calibrate_quantizers, quantize_model
from acs_hf.quantization import LSQQuantizer, lsq_fake_quant
from acs_hf.quantization.reference import lsq_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU only to try the script itself


ok = True
cases = [(torch.float32, torch.contiguous_format), (torch.float32, torch.channels_last),
         (torch.bfloat16, torch.contiguous_format), (torch.bfloat16, torch.channels_last)]  # fmt: skip
for compiled in (False, True):
    for dtype, fmt in cases:
        x = (torch.randn(64, 32, 28, 28, device=DEVICE) * 2).to(dtype).to(memory_format=fmt).requires_grad_()
        s = torch.tensor([0.3], device=DEVICE, requires_grad=True)
        v = x.detach().double() / s.detach().double()
        tie = ((v - v.floor()) - 0.5).abs() < 1e-5
        g = torch.randn_like(x).masked_fill(tie, 0)
        y = lsq_fake_quant(x, s, 4, True, compiled=compiled)
        y.backward(g)
        ref_out, ref_gs = lsq_reference(x, s, 4, True, grad_output=g)
        keep = ~tie.cpu()
        err_out = ((y.double().cpu() - ref_out)[keep].norm() / ref_out[keep].norm()).item()
        err_gs = abs(s.grad.item() - ref_gs.item()) / abs(ref_gs.item())
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        good = err_out < tol and err_gs < 1e-3 and y.dtype == dtype
        ok &= good
        print(
            f"compiled={compiled} {dtype} {fmt}: {int(tie.sum())} near-ties left out, out rel err {err_out:.1e}, "
            f"step grad rel err {err_gs:.1e} "
            f"{'OK' if good else 'FAIL'}",
            flush=True,
        )

# The whole model compiled: outputs, input gradients and every LSQ step gradient against eager.
torch.manual_seed(0)
size = 64 if DEVICE == "cuda" else 32
model = quantize_model(timm.create_model("resnet18", num_classes=10), QuantConfig(4, 4, 8)).to(DEVICE)
x = torch.randn(16, 3, size, size, device=DEVICE)
calibrate_quantizers(model, [x])
model.train()
compiled_model = torch.compile(model)
grads = []
for m in (model, compiled_model):
    model.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    out = m(xi)
    out.square().mean().backward()
    quantizers = [q for q in model.modules() if isinstance(q, LSQQuantizer) and q.step.requires_grad]
    steps = [q.step.grad.clone() if q.step.grad is not None else torch.zeros_like(q.step) for q in quantizers]
    grads.append((out.detach(), xi.grad, steps))
(out_e, gx_e, gs_e), (out_c, gx_c, gs_c) = grads


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


step_err = max(rel(c, e) for c, e in zip(gs_c, gs_e))
errs = (rel(out_c, out_e), rel(gx_c, gx_e), step_err)
# Fused kernels may round x/s differently at exact ties (see above), flipping a few codes: loose bounds.
good = errs[0] < 1e-3 and errs[1] < 1e-2 and step_err < 5e-2
ok &= good
print(
    f"compiled whole model (resnet18 W4A4, {size}x{size}): out rel err {errs[0]:.1e}, input grad rel err "
    f"{errs[1]:.1e}, worst step grad rel err {step_err:.1e} over {len(gs_e)} quantizers {'OK' if good else 'FAIL'}",
    flush=True,
)
sys.exit(0 if ok else 1)
