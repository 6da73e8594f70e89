"""Fake quantization: float tensors rounded to the integer grid, with straight-through gradients.

Built on aten's fused kernels ``fake_quantize_per_tensor_affine`` / ``fake_quantize_per_channel_affine`` (one
pass; the backward is the straight-through estimator: gradient 1 inside the representable range, 0 where the
value saturates). aten computes ``nearbyint(x * float32(1 / s))``: ties to even, and a product by the reciprocal,
which is the integer model's ``x / s`` exactly when ``s`` is a power of two and can differ by one step within
float rounding of a tie otherwise. That is exactly what convert does with weights (docs/numerics.md section 3),
and it models the requantization of every activation inside the integer region, which no float computation
reproduces bit for bit. Where the integer model itself quantizes floats (a QuantStub, a float fallback's way
back) and on a target whose rule is half up (:class:`~edgeq.targets.Rounding`), activations are fake quantized by
:class:`_FakeQuantizeExact` instead: ``saturate(round(x / s)) * s`` with the target's ties and the same gradient,
the integer model's quantize bit for bit. Fake quantization computes in float32 whatever ``torch.autocast`` says.
"""

from __future__ import annotations

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
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32), persistent=False)

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        if self.observer is not None and self.fake_quant_state.observes:
            self.observer.observe(value)
        if not self.fake_quant_state.fake_quantizes:
            return value
        value = value.to(torch.float32)
        scale = torch.tensor(self.scale(), dtype=torch.float32, device=value.device)
        if self.exact:
            return _FakeQuantizeExact.apply(value, scale, self.rounding)
        return torch.fake_quantize_per_tensor_affine(value, scale, self.zero_point, ACTIVATION_QMIN, ACTIVATION_QMAX)

    def scale(self) -> float:
        """The float32 scale this tensor is quantized with now.

        Raises:
            QuantizationError: the observer has seen no data (neither calibration nor QAT has run).
        """
        if self.fixed_scale is not None:
            return self.fixed_scale
        assert self.observer is not None
        if not self.observer.has_data:
            raise QuantizationError(
                f"'{self.owner}': its activation range has not been observed; run calibration "
                "(set_fake_quantize(model, FakeQuantState.CALIBRATION) and a few batches) or QAT first"
            )
        low, high = self.observer.clipping_range()
        amax = torch.tensor(max(-low, high, 0.0))
        return float(scale_from_amax(amax, ACTIVATION_QMAX, self.scale_rule))

    def extra_repr(self) -> str:
        rounding = f", rounding={self.rounding.value}" if self.rounding is not Rounding.HALF_TO_EVEN else ""
        if self.fixed_scale is not None:
            return f"fixed_scale={self.fixed_scale:.6g}{rounding}"
        return f"scale_rule={self.scale_rule.value}{rounding}"


class _FakeQuantizeExact(torch.autograd.Function):
    """``saturate(round(x / s), -128, 127) * s`` (float32 division and ties by the target's rule, as the integer
    model's quantize), with aten's straight-through gradient: 1 where the rounded value is inside the range, 0
    where it saturates."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, value: torch.Tensor, scale: torch.Tensor, rounding: Rounding) -> torch.Tensor:
        steps = round_half(value / scale, rounding)
        inside = (steps >= ACTIVATION_QMIN) & (steps <= ACTIVATION_QMAX)
        ctx.save_for_backward(inside)
        return torch.clamp(steps, ACTIVATION_QMIN, ACTIVATION_QMAX) * scale

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (inside,) = ctx.saved_tensors
        return grad * inside.to(grad.dtype), None, None


def weight_scales(weight: torch.Tensor, rule: ScaleRule) -> torch.Tensor:
    """Per-output-channel (axis 0) symmetric float32 scales of a weight, from its absolute maximum."""
    amax = weight.detach().abs().reshape(weight.shape[0], -1).amax(dim=1)
    return scale_from_amax(amax, WEIGHT_QMAX, rule)


def fake_quantize_weight(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Round a weight to int8 per output channel (range [-127, 127]) and back, with straight-through gradients."""
    zero_points = torch.zeros(scales.shape, dtype=torch.int32, device=weight.device)
    return torch.fake_quantize_per_channel_affine(weight, scales, zero_points, 0, WEIGHT_QMIN, WEIGHT_QMAX)
