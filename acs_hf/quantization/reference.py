"""A float64 LSQ reference, straight from the formulas, for tests and device checks.

Slow and allocation-heavy on purpose: every quantity is computed separately, in float64 on the
CPU, so that the fused op (:func:`~acs_hf.quantization.lsq_fake_quant`) can be checked against it.
"""

from __future__ import annotations

import math

import torch

from .lsq import quant_range

__all__ = ["lsq_reference"]


def lsq_reference(
    x: torch.Tensor,
    step: torch.Tensor | float,
    bits: int,
    signed: bool,
    grad_output: torch.Tensor | None = None,
    channel_dim: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x_hat, d loss / d step)`` in float64.

    ``x_hat = s * clamp(round(x / s), -Qn, Qp)``; with ``grad_output`` g, the step gradient is
    ``sum(g * d) / sqrt(n * Qp)`` with ``d = round(x/s) - x/s`` inside the range, ``-Qn`` below and
    ``Qp`` above, summed per channel along ``channel_dim`` (``n`` elements share one step).
    """
    qn, qp = quant_range(bits, signed)
    x = x.detach().double().cpu()
    s = torch.as_tensor(step).detach().double().cpu().reshape(-1)
    if channel_dim is not None:
        shape = [1] * x.dim()
        shape[channel_dim] = -1
        s = s.view(shape)
    v = x / s
    out = s * torch.clamp(torch.round(v), -qn, qp)
    if grad_output is None:
        return out, None
    g = grad_output.detach().double().cpu()
    d = torch.where(v < -qn, torch.full_like(v, -qn), torch.where(v > qp, torch.full_like(v, qp), v.round() - v))
    if channel_dim is None:
        return out, (g * d).sum().reshape(1) / math.sqrt(x.numel() * qp)
    dims = [i for i in range(x.dim()) if i != channel_dim]
    n = x.numel() // x.shape[channel_dim]
    return out, (g * d).sum(dims) / math.sqrt(n * qp)
