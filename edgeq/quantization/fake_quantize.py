"""Fake quantization: float tensors rounded to the integer grid, with straight-through gradients.

One function, :func:`fake_quantize`, for activations and weights at any scales: ``saturate(round(x * (1/s))) * s``
(aten's computation in ``fake_quantize_per_tensor_affine`` / ``fake_quantize_per_channel_affine``: the product
by the float32 reciprocal, ties to even) or ``saturate(round(x / s)) * s`` (the integer model's quantize, ties by
the target's rule), with aten's straight-through gradient: 1 where the rounded value is in the range, 0 where it
saturates. It is a few of aten's vectorized elementwise ops (product, round, clamp, product) and, backward,
the product again and aten's ``hardtanh_backward`` on it: about twice as fast as aten's fused fake-quant kernels
on the CPU, a scalar loop there that writes a boolean mask (docs/training.md "Speed of the QAT
step"), and equal to them bit for bit (tests/test_qat_precision.py). On other devices (a GPU) aten's kernels run.

The product by ``1/s`` is exactly the integer model's ``x / s`` when ``s`` is a power of two and can differ by one
step within float rounding of a tie otherwise. That is exactly what convert does with weights (docs/numerics.md
section 3), and it models the requantization of every activation inside the integer region, which no float
computation reproduces bit for bit. Where the integer model itself quantizes floats (a QuantStub, a float
fallback's way back) and on a target whose rule is half up (:class:`~edgeq.targets.Rounding`), activations are
fake quantized by division with the target's ties instead, the integer model's quantize bit for bit. Fake
quantization computes in float32 whatever ``torch.autocast`` says; nothing in it reads a tensor on the host.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from edgeq.errors import QuantizationError
from edgeq.numerics import (
    ACTIVATION_QMAX,
    ACTIVATION_QMIN,
    WEIGHT_QMAX,
    WEIGHT_QMIN,
    float32,
    round_half,
    scale_from_amax,
)
from edgeq.quantization.observers import Observer
from edgeq.quantization.state import FakeQuantStateful
from edgeq.targets import Rounding, ScaleRule


class ActivationFakeQuantize(FakeQuantStateful):
    """Quantizes one activation tensor to int8 (per tensor, zero point 0).

    Args:
        observer: chooses the range; ``None`` when the scale is fixed.
        scale_rule: the target's :class:`~edgeq.targets.ScaleRule`.
        fixed_scale: a scale that nothing changes (a ``QuantStub(scale=...)``).
        owner: the node this quantizer belongs to, for error messages.
        rounding: the target's :class:`~edgeq.targets.Rounding` of ties.
        quantizes_float: the integer model quantizes this tensor from float (``x / s``) rather than requantizing
            it: fake quantize exactly as it does (a QuantStub, a float fallback's way back).
    """

    def __init__(
        self,
        observer: Observer | None,
        scale_rule: ScaleRule,
        fixed_scale: float | None = None,
        owner: str = "",
        rounding: Rounding = Rounding.HALF_TO_EVEN,
        quantizes_float: bool = False,
    ) -> None:
        super().__init__()
        if (observer is None) == (fixed_scale is None):
            raise ValueError("give exactly one of observer and fixed_scale")
        self.observer = observer
        self.scale_rule = scale_rule
        self.fixed_scale = None if fixed_scale is None else float32(fixed_scale)
        self.owner = owner
        self.rounding = rounding
        self.exact = quantizes_float or rounding is not Rounding.HALF_TO_EVEN

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        self._observe(value)
        if not self.fake_quant_state.fake_quantizes:
            return value
        scale = self.scale_tensor().to(value.device)
        return fake_quantize(value.to(torch.float32), scale, ACTIVATION_QMIN, ACTIVATION_QMAX, self.rounding, self.exact)

    def fuses_clamp(self, value: torch.Tensor) -> bool:
        """Whether :meth:`clamp_and_quantize` applies to ``value`` now: this quantizer fake quantizes, by the product,
        a float32 tensor on the CPU."""
        return self.fake_quant_state.fake_quantizes and not self.exact and value.device.type == "cpu" and value.dtype == torch.float32

    def clamp_and_quantize(self, value: torch.Tensor, bounds: tuple[float, float | None]) -> torch.Tensor:
        """A ReLU / ReLU6 (``bounds``: its clamp) and this quantizer in one (where :meth:`fuses_clamp`): the values and
        gradients of the in-place activation followed by :meth:`forward`, with an activation-sized tensor fewer each
        way (the clamp is fake quantized in place; the backward clamps the input again instead of the in-place
        ReLU6's saved copy of it)."""
        with torch.no_grad():
            clamped = torch.clamp(value, *bounds)
        self._observe(clamped)
        return _ClampFakeQuantize.apply(value, clamped, self.scale_tensor(), bounds)

    def _observe(self, value: torch.Tensor) -> None:
        """Observe ``value`` if this state observes; otherwise, if it fake quantizes, check that a range is known (a
        range this call just observed needs no check, and no read on the host)."""
        if self.observer is not None and self.fake_quant_state.observes:
            self.observer.observe(value)
        elif self.fake_quant_state.fake_quantizes:
            self._check_observed()

    def scale_tensor(self) -> torch.Tensor:
        """The float32 scale this tensor is quantized with now, a 0-d tensor (on the observer's device), computed
        without reading anything on the host; :meth:`scale` checks that a range has been observed."""
        if self.fixed_scale is not None:
            return torch.tensor(self.fixed_scale, dtype=torch.float32)
        assert self.observer is not None
        return scale_from_amax(self.observer.clipping_amax(), ACTIVATION_QMAX, self.scale_rule)

    def scale(self) -> float:
        """The float32 scale this tensor is quantized with now.

        Raises:
            QuantizationError: the observer has seen no data (neither calibration nor QAT has run).
        """
        self._check_observed()
        return float(self.scale_tensor())

    def _check_observed(self) -> None:
        if self.observer is not None and not self.observer.has_data:
            raise QuantizationError(
                f"'{self.owner}': its activation range has not been observed; run calibration "
                "(set_fake_quantize(model, FakeQuantState.CALIBRATION) and a few batches) or QAT first"
            )

    def extra_repr(self) -> str:
        rounding = f", rounding={self.rounding.value}" if self.rounding is not Rounding.HALF_TO_EVEN else ""
        if self.fixed_scale is not None:
            return f"fixed_scale={self.fixed_scale:.6g}{rounding}"
        return f"scale_rule={self.scale_rule.value}{rounding}"


def fake_quantize(
    value: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, rounding: Rounding, divides: bool
) -> torch.Tensor:
    """``saturate(round(x * (1/s))) * s`` (or ``x / s`` with ``divides``) with straight-through gradients, ``scale`` a
    0-d tensor or one per channel along axis 0 (shaped to broadcast). On the CPU :class:`_FakeQuantize`; elsewhere,
    unless it divides, aten's fused kernels, which compute the same numbers and are one vectorized pass on a GPU."""
    if divides or value.device.type == "cpu":
        return _FakeQuantize.apply(value, scale, qmin, qmax, rounding, divides)
    if scale.dim() == 0:
        zero_point = torch.zeros((), dtype=torch.int32, device=value.device)
        return torch.fake_quantize_per_tensor_affine(value, scale, zero_point, qmin, qmax)
    scales = scale.reshape(-1)
    zero_points = torch.zeros(scales.shape, dtype=torch.int32, device=value.device)
    return torch.fake_quantize_per_channel_affine(value, scales, zero_points, 0, qmin, qmax)


class _FakeQuantize(torch.autograd.Function):
    """``saturate(round(x * (1/s)), qmin, qmax) * s`` (aten's fake-quant computation, ties to even), or with
    ``divides`` ``saturate(round(x / s), qmin, qmax) * s`` with ties by ``rounding`` (the integer model's quantize);
    ``scale`` broadcasts against ``value`` (one per tensor, or per channel). The gradient is aten's
    straight-through one: the incoming gradient where the rounded value is in ``[qmin, qmax]``, 0 elsewhere.
    A NaN stays NaN (aten's kernels return ``qmin * s``).

    Multiplying, the forward rounds, clamps and scales one new tensor in place and saves its input; the backward
    computes ``x * (1/s)`` again and masks it in place where it rounds outside the range (``hardtanh_backward``
    between :func:`_product_bounds`). No tensor of steps lives from the forward to the backward. Dividing, the
    rounded steps are saved and masked between ``qmin - 1/2`` and ``qmax + 1/2``."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        value: torch.Tensor,
        scale: torch.Tensor,
        qmin: int,
        qmax: int,
        rounding: Rounding,
        divides: bool,
    ) -> torch.Tensor:
        if divides:
            steps = round_half(value / scale, rounding)
            ctx.save_for_backward(steps)
            ctx.bounds = (qmin - 0.5, qmax + 0.5)
            return torch.clamp(steps, qmin, qmax).mul_(scale)
        reciprocal = torch.reciprocal(scale)
        ctx.save_for_backward(value, reciprocal)
        ctx.bounds = _product_bounds(qmin, qmax)
        return torch.mul(value, reciprocal).round_().clamp_(qmin, qmax).mul_(scale)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = ctx.saved_tensors
        if len(saved) == 1:  # the rounded steps of a division
            return torch.ops.aten.hardtanh_backward(grad, saved[0], *ctx.bounds), None, None, None, None, None
        value, reciprocal = saved
        product = torch.mul(value, reciprocal)
        masked = torch.ops.aten.hardtanh_backward(grad, product, *ctx.bounds, grad_input=product)
        return masked, None, None, None, None, None


class _ClampFakeQuantize(torch.autograd.Function):
    """Activation fake quantization (:class:`_FakeQuantize` by the product) of ``clamp(x, low, high)``, a ReLU
    (``high`` None) or ReLU6 before it, given that clamp, which it fake quantizes in place. The backward clamps and
    multiplies ``x`` again, masks like :class:`_FakeQuantize`, then like the activation's own backward in aten
    (``threshold_backward`` on ``x`` for a ReLU, ``hardtanh_backward`` for a ReLU6), in place."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        value: torch.Tensor,
        clamped: torch.Tensor,
        scale: torch.Tensor,
        bounds: tuple[float, float | None],
    ) -> torch.Tensor:
        reciprocal = torch.reciprocal(scale)
        ctx.save_for_backward(value, reciprocal)
        ctx.clamp_bounds = bounds
        ctx.mark_dirty(clamped)
        return clamped.mul_(reciprocal).round_().clamp_(ACTIVATION_QMIN, ACTIVATION_QMAX).mul_(scale)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        value, reciprocal = ctx.saved_tensors
        low, high = ctx.clamp_bounds
        masked = torch.clamp(value, low, high).mul_(reciprocal)
        torch.ops.aten.hardtanh_backward(grad, masked, *_product_bounds(ACTIVATION_QMIN, ACTIVATION_QMAX), grad_input=masked)
        if high is None:
            torch.ops.aten.threshold_backward(masked, value, low, grad_input=masked)
        else:
            torch.ops.aten.hardtanh_backward(masked, value, low, high, grad_input=masked)
        return masked, None, None, None


@functools.cache
def _product_bounds(qmin: int, qmax: int) -> tuple[float, float]:
    """The float32 bounds, both excluded, between which ``t`` rounds (ties to even) into ``[qmin, qmax]``:
    ``qmin - 1/2`` rounds to ``qmin`` when it is even (the bound is then the float32 below it), ``qmax + 1/2`` to
    ``qmax`` when it is even (the bound is then the float32 above it)."""
    low, high = np.float32(qmin - 0.5), np.float32(qmax + 0.5)
    if qmin % 2 == 0:
        low = np.nextafter(low, np.float32(-np.inf))
    if qmax % 2 == 0:
        high = np.nextafter(high, np.float32(np.inf))
    return float(low), float(high)


def weight_scales(weight: torch.Tensor, rule: ScaleRule) -> torch.Tensor:
    """Per-output-channel (axis 0) symmetric float32 scales of a weight, from its absolute maximum."""
    amax = weight.detach().abs().reshape(weight.shape[0], -1).amax(dim=1)
    return scale_from_amax(amax, WEIGHT_QMAX, rule)


def fake_quantize_weight(weight: torch.Tensor, rule: ScaleRule) -> torch.Tensor:
    """Round a weight to int8 per output channel at its own scales (:func:`weight_scales`) and back, with
    straight-through gradients: aten's ``fake_quantize_per_channel_affine`` at those scales, bit for bit.

    At its own scales no value saturates: ``|w| * (1/s)`` is at most ``127 * (1 + 3 * 2**-24)``, which rounds to
    127 (a power-of-two scale is only larger). So on the CPU this is ``round(w * (1/s)) * s`` and the gradient
    passes unchanged, without the clamp, the saved steps and the masking pass of :func:`fake_quantize`."""
    scales = weight_scales(weight, rule).reshape(-1, *([1] * (weight.dim() - 1)))
    if weight.device.type != "cpu":
        return fake_quantize(weight, scales, WEIGHT_QMIN, WEIGHT_QMAX, Rounding.HALF_TO_EVEN, False)
    return _RoundToScale.apply(weight, scales)


class _RoundToScale(torch.autograd.Function):
    """``round(x * (1/s)) * s`` with the gradient passed unchanged: fake quantization where nothing saturates."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, value: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return torch.mul(value, torch.reciprocal(scale)).round_().mul_(scale)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None
