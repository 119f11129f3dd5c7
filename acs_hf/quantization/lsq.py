"""Learned Step Size Quantization (LSQ, Esser et al., ICLR 2020).

The fake-quant op is one fused ``torch.autograd.Function`` so that the backward pass needs a
single recomputation of ``x / s`` instead of the half-dozen saved intermediates that a chain of
plain ops would keep alive.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

__all__ = ["LSQQuantizer", "lsq_fake_quant", "quant_range", "check_bits", "STEP_FLOOR"]

#: Smallest step the fake-quant op ever divides by (see :class:`LSQQuantizer`).
STEP_FLOOR = 1e-8


def check_bits(name: str, value: object, allow_none: bool = False) -> None:
    """The one rule for every bit width: an integer in 2..8 (or None where that means "not quantized")."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
        accepted = "an integer in 2..8" + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {accepted}, got {value!r}")


def quant_range(bits: int, signed: bool) -> tuple[int, int]:
    """Return ``(Qn, Qp)``: the integer codes span ``[-Qn, Qp]``."""
    if signed:
        return 2 ** (bits - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


# qn/qp arrive as 0-d tensors so that torch.compile does not specialise on every bit width.
def _fake_quant_fwd(x: torch.Tensor, s: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return (x.float() / s).clamp_(lo, hi).round_().mul_(s).to(x.dtype)


def _fake_quant_bwd(
    x: torch.Tensor,
    s: torch.Tensor,
    g: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    v = x.float() / s
    c = v.clamp(lo, hi)
    inside = c == v
    gf = g.float()
    grad_x = torch.where(inside, gf, 0.0)
    # d x_hat / d s = round(v) - v inside, -Qn below, Qp above  ==  round(c) - inside * v
    if torch.compiler.is_compiling():  # one fused loop
        grad_s = (gf * c.round() - grad_x * v).sum(dim=1)
    else:  # row-wise dot products (BLAS) instead of full-size temporaries
        grad_s = torch.einsum("cn,cn->c", gf, c.round_()) - torch.einsum("cn,cn->c", grad_x, v)
    return grad_x.to(g.dtype), grad_s


_KERNELS: dict[bool, tuple] = {False: (_fake_quant_fwd, _fake_quant_bwd)}


def _kernels(compiled: bool) -> tuple:
    """(forward, backward) math; compiled once per process with ``torch.compile`` on request."""
    if compiled not in _KERNELS:
        _KERNELS[True] = (
            torch.compile(_fake_quant_fwd, dynamic=True),
            torch.compile(_fake_quant_bwd, dynamic=True),
        )
    return _KERNELS[compiled]


@functools.lru_cache(maxsize=64)
def _bounds(qn: int, qp: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """-Qn and Qp as 0-d float32 tensors, made once per device: creating them on every call
    would cost a host-to-device copy per quantizer per step on a GPU. Made outside inference mode,
    since a first call from a scoring pass must not cache tensors that training cannot save."""
    with torch.inference_mode(False):
        return (
            torch.tensor(-qn, dtype=torch.float32, device=device),
            torch.tensor(qp, dtype=torch.float32, device=device),
        )


class _LSQFakeQuant(torch.autograd.Function):
    """x_hat = s * clamp(round(x / s), -Qn, Qp), with the LSQ gradients.

    d x_hat / d x = 1 inside the range, 0 outside (straight-through estimator for round).
    d x_hat / d s = round(x/s) - x/s inside, -Qn below, Qp above; scaled by ``grad_scale``.
    All arithmetic is float32 whatever the input dtype; the output has the input's dtype. Only
    ``x`` and ``s`` are saved: the backward recomputes ``x / s`` rather than keeping temporaries.
    The kernels see ``x`` as a [steps, elements] matrix, so one compiled graph serves every layer.
    """

    @staticmethod
    def forward(ctx, x, step, qn, qp, grad_scale, channel_dim, compiled):  # noqa: D102
        dims = _layout(x, step.numel(), channel_dim)
        x2 = _as_matrix(x, dims, step.numel())
        s = step.float().clamp_min(STEP_FLOOR).view(-1, 1)
        # Traced into a compiled model, the bounds become graph constants (and the cache is skipped).
        bounds = _bounds.__wrapped__ if torch.compiler.is_compiling() else _bounds
        lo, hi = bounds(qn, qp, x.device)
        ctx.save_for_backward(x2, s, lo, hi)
        ctx.grad_scale, ctx.compiled, ctx.dims, ctx.shape = grad_scale, compiled, dims, x.shape
        # Autocast off and detached (non-view) inputs: the math stays float32 and torch.compile
        # sees one global state and no view bases, i.e. one graph per input dtype.
        with torch.autocast(x.device.type, enabled=False):
            if s.numel() == 1:  # elementwise on x itself: the output is no view, so in-place ops may follow
                return _kernels(compiled)[0](x.detach(), s.view(()), lo, hi)
            y = _kernels(compiled)[0](x2.detach(), s, lo, hi)
        return _from_matrix(y, x.shape, dims)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        x2, s, lo, hi = ctx.saved_tensors
        # The gradient is flattened in the forward's element order, whatever its own layout.
        g2 = _as_matrix(grad_out, ctx.dims, s.numel())
        with torch.autocast(x2.device.type, enabled=False):
            grad_x, grad_step = _kernels(ctx.compiled)[1](x2.detach(), s, g2.detach(), lo, hi)
        grad_x = _from_matrix(grad_x, ctx.shape, ctx.dims)
        return grad_x, grad_step * ctx.grad_scale, None, None, None, None, None


def _layout(x: torch.Tensor, steps: int, channel_dim: int) -> tuple[int, ...]:
    """Permutation that makes ``x`` a [steps, elements] matrix: channel first for per-channel
    steps; for one step, memory order (a free view for contiguous and channels_last tensors)."""
    if steps > 1:
        c = channel_dim % x.dim()
        return (c, *(d for d in range(x.dim()) if d != c))
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return (0, 2, 3, 1)
    return tuple(range(x.dim()))


def _as_matrix(x: torch.Tensor, dims: tuple[int, ...], steps: int) -> torch.Tensor:
    return x.permute(dims).reshape(steps, -1)


def _from_matrix(y: torch.Tensor, shape: torch.Size, dims: tuple[int, ...]) -> torch.Tensor:
    inverse = sorted(range(len(dims)), key=dims.__getitem__)
    return y.view([shape[d] for d in dims]).permute(inverse)


def lsq_fake_quant(
    x: torch.Tensor,
    step: torch.Tensor,
    bits: int,
    signed: bool,
    channel_dim: int = 0,
    grad_scale: float | None = None,
    compiled: bool = False,
) -> torch.Tensor:
    """Functional LSQ fake quantization.

    Args:
        x: tensor to quantize (any float dtype; math runs in float32).
        step: step size, shape ``[1]`` or ``[C]`` with ``C == x.shape[channel_dim]``.
        bits: bit width, 2..8.
        signed: signed codes ``[-2^(b-1), 2^(b-1)-1]`` or unsigned ``[0, 2^b-1]``.
        channel_dim: dimension that carries the per-channel steps.
        grad_scale: multiplier of the step gradient; defaults to LSQ's ``1/sqrt(n*Qp)`` where ``n``
            is the number of elements sharing one step.
        compiled: run the math as ``torch.compile``-fused kernels (one pass over the data instead of
            several; the first call of each shape family pays the compile).
    """
    qn, qp = quant_range(bits, signed)
    if grad_scale is None:
        grad_scale = 1.0 / math.sqrt(x.numel() / step.numel() * qp)
    return _LSQFakeQuant.apply(x, step, qn, qp, grad_scale, channel_dim, compiled)


class LSQQuantizer(nn.Module):
    """LSQ fake quantizer with a learnable step size.

    Args:
        bits: bit width, 2..8.
        signed: ``True`` for signed codes, ``False`` for unsigned, ``None`` to decide at
            calibration (unsigned when the calibration data holds no negative value).
        per_channel: one step per slice along ``channel_dim`` (needs ``num_channels``).
        channel_dim: the channel dimension for per-channel steps.
        num_channels: number of channels; the step is created at its final shape so that an
            optimizer built before calibration keeps pointing at the right Parameter.
        compiled: use the ``torch.compile``-fused kernels (see :func:`lsq_fake_quant`).
        learn_step: whether the step is a trainable Parameter (``False``: calibrated, then fixed).
        name: qualified name used in error messages (e.g. ``layer1.0.conv1.input_quantizer``).

    The step must stay positive. It is learnt unconstrained and clamped to :data:`STEP_FLOOR` inside
    the fake-quant op, with the gradient passed straight through that clamp: a parametrisation such
    as ``exp(log_s)`` would change LSQ's published gradient, while a clamp with a zero gradient
    would freeze a step that a bad optimizer update pushed below the floor. With the straight-through
    clamp, the forward pass stays finite and the step can recover.

    Using the quantizer before it is initialised (:meth:`init_from` or
    :func:`acs_hf.calibrate_quantizers`) raises a ``RuntimeError``.
    """

    def __init__(
        self,
        bits: int,
        signed: bool | None = None,
        per_channel: bool = False,
        channel_dim: int = 0,
        num_channels: int | None = None,
        compiled: bool = False,
        learn_step: bool = True,
        name: str = "",
    ) -> None:
        super().__init__()
        check_bits("bits", bits)
        if per_channel and (num_channels is None or num_channels < 1):
            raise ValueError(f"per_channel=True needs num_channels >= 1, got {num_channels!r}")
        self.bits = bits
        self.per_channel = per_channel
        self.channel_dim = channel_dim
        self.compiled = compiled
        self.name = name
        self.step = nn.Parameter(torch.ones(num_channels if per_channel else 1), requires_grad=learn_step)
        # Buffers so that Trainer checkpoints (plain state dicts) carry the calibration state.
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("signed_flag", torch.tensor(bool(signed)))
        self._signed = signed
        self._initialized = False
        self._observing = False
        self._obs_abs_sum = 0.0
        self._obs_count = 0
        self._obs_min = math.inf

    # -- state ---------------------------------------------------------------------------
    @property
    def signed(self) -> bool | None:
        """Whether codes are signed; ``None`` until decided by calibration."""
        return self._signed

    @property
    def is_initialized(self) -> bool:
        return self._initialized

    @property
    def qrange(self) -> tuple[int, int]:
        if self._signed is None:
            raise RuntimeError(f"{self._label()}: signedness is undecided until calibration")
        return quant_range(self.bits, self._signed)

    def _label(self) -> str:
        return f"LSQQuantizer {self.name!r}" if self.name else "LSQQuantizer"

    def _set_state(self, signed: bool, initialized: bool) -> None:
        self._signed = signed
        self._initialized = initialized
        self.signed_flag.fill_(signed)
        self.initialized.fill_(initialized)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "initialized" in state_dict:
            self.sync_state_from_buffers()

    def sync_state_from_buffers(self) -> None:
        """Take the calibration state from the ``initialized`` / ``signed_flag`` buffers, for
        loaders that assign tensors without ``load_state_dict`` (transformers' ``from_pretrained``)."""
        self._initialized = bool(self.initialized)
        self._signed = bool(self.signed_flag) if self._initialized else self._signed

    # -- initialisation ------------------------------------------------------------------
    @torch.no_grad()
    def init_from(self, tensor: torch.Tensor) -> None:
        """Initialise the step from data: ``s = 2 * mean(|v|) / sqrt(Qp)`` (per channel if set).

        Also fixes the signedness when it was left to the data.
        """
        t = tensor.detach().float()
        if t.numel() == 0:
            raise ValueError(f"{self._label()}: cannot initialise from an empty tensor")
        signed = self._signed if self._signed is not None else bool(t.min() < 0)
        _, qp = quant_range(self.bits, signed)
        if self.per_channel:
            if t.shape[self.channel_dim] != self.step.numel():
                raise ValueError(
                    f"{self._label()}: tensor has {t.shape[self.channel_dim]} channels along dim "
                    f"{self.channel_dim}, the step has {self.step.numel()}"
                )
            mean_abs = t.abs().transpose(0, self.channel_dim).reshape(self.step.numel(), -1).mean(1)
        else:
            mean_abs = t.abs().mean().reshape(1)
        self.step.copy_(self._safe_step(2 * mean_abs / math.sqrt(qp)))
        self._set_state(signed, True)

    @staticmethod
    def _safe_step(step: torch.Tensor) -> torch.Tensor:
        # An all-zero tensor (e.g. a zero-initialised layer) would give s = 0.
        return torch.where(step > STEP_FLOOR, step, torch.full_like(step, 1e-3))

    def start_observing(self) -> None:
        """Pass inputs through unchanged while accumulating statistics for :meth:`finish_observing`."""
        self._observing = True
        self._obs_abs_sum, self._obs_count, self._obs_min = 0.0, 0, math.inf

    def stop_observing(self) -> None:
        """Leave observation mode without initialising (e.g. when calibration failed)."""
        self._observing = False

    @property
    def observing(self) -> bool:
        return self._observing

    @torch.no_grad()
    def finish_observing(self) -> None:
        """Initialise the (per-tensor) step from the statistics seen since :meth:`start_observing`."""
        self.stop_observing()
        if self._obs_count == 0:
            raise RuntimeError(f"{self._label()}: no data reached this quantizer during calibration")
        signed = self._signed if self._signed is not None else self._obs_min < 0
        _, qp = quant_range(self.bits, signed)
        step = torch.full_like(self.step, 2 * self._obs_abs_sum / self._obs_count / math.sqrt(qp))
        self.step.copy_(self._safe_step(step))
        self._set_state(signed, True)

    # -- forward -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._observing:
            with torch.no_grad():
                xf = x.detach().float()
                self._obs_abs_sum += float(xf.abs().sum())
                self._obs_count += xf.numel()
                self._obs_min = min(self._obs_min, float(xf.min()))
            return x
        if not self._initialized:
            raise RuntimeError(
                f"{self._label()} was used before its step size was initialised. Call "
                "acs_hf.calibrate_quantizers(model, batches) (or quantizer.init_from(tensor)) first."
            )
        return lsq_fake_quant(x, self.step, self.bits, self._signed, self.channel_dim, compiled=self.compiled)

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, signed={self._signed}, per_channel={self.per_channel}, initialized={self._initialized}"
        )
