"""Correctness of the LSQ op on a CUDA device before timing it: eager and compiled kernels, bf16,
channels_last, against a float64 CPU reference. Prints one line per case and exits 1 on a miss.

Elements whose x/s lies within 1e-5 of a rounding tie (k + 0.5) are left out of the comparison (and
counted): there, a division that differs in the last bit (Triton's fp32 division is not IEEE-exact)
legitimately picks the other code. Their gradient is zeroed so the step gradient compares exactly.
"""

import sys

import torch

from acs_hf.quantization import lsq_fake_quant
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
sys.exit(0 if ok else 1)
