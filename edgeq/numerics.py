"""edgeq's integer numerics: the one implementation of ``docs/numerics.md``.

Every integer computation that edgeq performs or emits is defined here, once, with the names the spec uses:
the integer model calls these functions on tensors, and the compiler derives the same multipliers and shifts
from the same scales. Nothing here clamps or substitutes silently: a value outside the range the hardware
can represent raises :class:`~edgeq.errors.QuantizationError` with the values.

Conventions (see the spec for the why):

- activations: int8, symmetric, zero point 0, range [-128, 127], one float32 scale per tensor;
- weights: int8, symmetric, range [-127, 127], one float32 scale per output channel;
- bias: int32 at scale ``s_in * s_w[c]``; accumulation in int32 (proved not to overflow, see
  :func:`check_accumulator_bound`);
- requantization: ``y = round_half_to_even(acc * M / 2**n)`` exactly in int64, with ``2**30 <= M < 2**31`` and
  ``1 <= n <= 62``: one rounding, to nearest with ties to even, the rule of every rounding in edgeq; ``M = 0``
  when the factor is below ``2**-32`` and the accumulator bound proves every output rounds to 0;
- float to int8: ``round_half_to_even(x / s)`` in float32, then saturation (as ONNX QuantizeLinear);
- int to float: ``float32(q) * s`` in float32 (as ONNX DequantizeLinear).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from edgeq.errors import QuantizationError
from edgeq.ops import Op, OpTable
from edgeq.targets import ScaleRule

ACTIVATION_QMIN = -128
ACTIVATION_QMAX = 127
WEIGHT_QMIN = -127
WEIGHT_QMAX = 127
INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1

MULTIPLIER_BITS = 31
"""A requantization multiplier M is a 31-bit positive integer: ``2**30 <= M < 2**31`` (or smaller when it
shares a shift with a larger one, see :func:`quantize_multipliers`)."""
MIN_SHIFT = 1
MAX_SHIFT = 62
SMALLEST_MULTIPLIER = 2.0 ** (MULTIPLIER_BITS - 1 - MAX_SHIFT)
"""2**-32: smaller factors need a shift above 62 (docs/numerics.md section 4)."""

SCALE_FLOOR = float(np.finfo(np.float32).eps)
"""The smallest scale an observer produces (2**-23): an all-zero tensor still gets a usable scale."""

RELU6_CEILING = 6.0


def float32(value: float) -> float:
    """Round a Python float to the nearest float32 and return it as a Python float."""
    return float(np.float32(value))


def scale_from_amax(amax: torch.Tensor, qmax: int, rule: ScaleRule) -> torch.Tensor:
    """The symmetric scale that maps ``amax`` to ``qmax``, per the target's scale rule.

    Args:
        amax: largest absolute value to represent (any shape: one scale per element), float.
        qmax: the largest quantized value (127 for activations and weights).
        rule: :class:`ScaleRule` of the target.

    Returns:
        float32 scales, ``max(amax, SCALE_FLOOR * qmax) / qmax``; for ``POWER_OF_TWO`` rounded up to the next
        power of two.
    """
    scale = torch.clamp(amax.detach().to(torch.float32), min=SCALE_FLOOR * qmax) / qmax
    if rule is ScaleRule.POWER_OF_TWO:
        mantissa, exponent = torch.frexp(scale)
        exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
        scale = torch.ldexp(torch.ones_like(scale), exponent)
    return scale


def is_power_of_two(scale: float) -> bool:
    """True when ``scale`` is exactly 2**k for an integer k."""
    mantissa, _ = math.frexp(scale)
    return scale > 0 and mantissa == 0.5


@dataclass(frozen=True)
class FixedPointMultiplier:
    """A real multiplier represented as ``multiplier * 2**-shift``."""

    multiplier: int
    shift: int

    def __post_init__(self) -> None:
        if not 0 <= self.multiplier < 2**MULTIPLIER_BITS:
            raise QuantizationError(f"multiplier {self.multiplier} outside [0, 2**31)")
        if not MIN_SHIFT <= self.shift <= MAX_SHIFT:
            raise QuantizationError(f"shift {self.shift} outside [{MIN_SHIFT}, {MAX_SHIFT}]")

    @property
    def real(self) -> float:
        """The real number this multiplier represents."""
        return math.ldexp(self.multiplier, -self.shift)


ZERO_MULTIPLIER = FixedPointMultiplier(0, MAX_SHIFT)
"""A factor proven to round every output to 0 (docs/numerics.md section 4): ``M = 0``."""


def quantize_multipliers(reals: Sequence[float], *, what: str) -> tuple[list[int], int]:
    """Represent real multipliers as 31-bit integers sharing one shift: ``real_i ~ M_i * 2**-n``.

    The shift is chosen so the largest multiplier uses all 31 bits (``2**30 <= M_max < 2**31``); each ``M_i`` is
    ``round_half_to_even(real_i * 2**n)``, which is exact in float64 before the rounding. One multiplier alone
    is the common case (:func:`quantize_multiplier`); elementwise add gives each input its own ``M_i`` with
    a shared shift, so their sum is rounded once.

    Raises:
        QuantizationError: a multiplier is not positive and finite, or needs a shift outside [1, 62]
            (it is at least 2**30, or so small that it rounds to zero), naming ``what``.
    """
    if not reals or any(not (math.isfinite(r) and r > 0) for r in reals):
        raise QuantizationError(f"{what}: requantization multipliers must be positive and finite; got {list(reals)}")
    largest = max(reals)
    _, exponent = math.frexp(largest)
    shift = MULTIPLIER_BITS - exponent
    if round(math.ldexp(largest, shift)) == 2**MULTIPLIER_BITS:
        shift -= 1
    if not MIN_SHIFT <= shift <= MAX_SHIFT:
        raise QuantizationError(
            f"{what}: requantization multiplier {largest:.6g} needs shift {shift}; "
            f"allowed: multipliers in [2**-32, 2**30) (shift {MIN_SHIFT}..{MAX_SHIFT}). "
            "The scales around this op are inconsistent: check its calibration"
        )
    multipliers = [round(math.ldexp(r, shift)) for r in reals]
    if min(multipliers) == 0:
        raise QuantizationError(
            f"{what}: multiplier {min(reals):.6g} rounds to zero next to {largest:.6g} with a shared shift {shift}; "
            "the input scales differ by more than 2**31"
        )
    return multipliers, shift


def quantize_multiplier(real: float, *, what: str, accumulator_bound: int | None = None) -> FixedPointMultiplier:
    """Represent one real multiplier as ``M * 2**-n`` (see :func:`quantize_multipliers`).

    Args:
        real: the requantization factor.
        what: the op (and channel), for messages.
        accumulator_bound: the largest ``|acc|`` the factor can multiply, when known (:func:`accumulator_bounds`).
            A factor below ``2**-32`` (shift above 62) for which ``accumulator_bound * real < 1/2`` gives 0 for
            every accumulator, exactly: it is represented as ``M = 0`` (shift 62), docs/numerics.md section 4.

    Raises:
        QuantizationError: as :func:`quantize_multipliers`, unless the bound proves the output is always 0.
    """
    if accumulator_bound is not None and 0 < real < SMALLEST_MULTIPLIER:
        if Fraction(real) * accumulator_bound < Fraction(1, 2):
            return ZERO_MULTIPLIER
        raise QuantizationError(
            f"{what}: requantization multiplier {real:.6g} is below 2**-32, and accumulators up to {accumulator_bound} "
            "can reach half a step; the scales around this op are inconsistent: check its calibration"
        )
    (multiplier,), shift = quantize_multipliers([real], what=what)
    return FixedPointMultiplier(multiplier, shift)


UINT8_SHIFT = 128
"""A uint8 activation ``q`` with zero point ``z`` is the int8 ``q - 128`` with zero point ``z - 128``
(docs/numerics.md section 9)."""


def int8_zero_point(dtype: str, zero_point: int) -> int:
    """A zero point in its int8 form: a uint8 one less :data:`UINT8_SHIFT`, others unchanged."""
    return zero_point - UINT8_SHIFT if dtype == "uint8" else zero_point


def largest_input_magnitude(zero_point: int = 0) -> int:
    """The largest ``|q - z|`` of an int8 activation with zero point ``z``: ``max(128 + z, 127 - z)``
    (128 for edgeq's own symmetric activations)."""
    return max(zero_point - ACTIVATION_QMIN, ACTIVATION_QMAX - zero_point)


def accumulator_bounds(
    weights: np.ndarray | torch.Tensor, bias: np.ndarray | torch.Tensor | None, axis: int, input_zero_point: int = 0
) -> list[int]:
    """Per output channel, the largest ``|acc|`` any int8 input can give: ``a * Σ_k |w_q[c, k]| + |b_q[c]|`` with
    ``a`` the :func:`largest_input_magnitude` (128 without a zero point).

    Args:
        weights: int8 weights; ``axis`` is the output-channel axis (0 for OIHW and for ``[out, in]``).
        bias: the int32 bias, one per channel, or None.
        axis: the output-channel axis of ``weights``.
        input_zero_point: the int8 input's zero point (docs/numerics.md section 9).
    """
    values = np.abs(np.moveaxis(np.asarray(weights, dtype=np.int64), axis, 0)).reshape(np.shape(weights)[axis], -1)
    totals = largest_input_magnitude(input_zero_point) * values.sum(axis=1)
    if bias is not None:
        totals = totals + np.abs(np.asarray(bias, dtype=np.int64).reshape(-1))
    return [int(t) for t in totals]


def real_multiplier(input_scale: float, output_scale: float, weight_scale: float = 1.0, count: int = 1) -> float:
    """The real requantization factor ``(s_in * s_w) / (s_out * count)`` evaluated in float64.

    ``count`` folds the 1/N of average pooling; ``weight_scale`` is 1 for ops without weights. All inputs are
    float32 values, so ``s_in * s_w`` is exact in float64.
    """
    return (float(input_scale) * float(weight_scale)) / (float(output_scale) * count)


def conv_multipliers(
    input_scale: float,
    weight_scales: Sequence[float],
    output_scale: float,
    *,
    what: str,
    bounds: Sequence[int] | None = None,
) -> list[FixedPointMultiplier]:
    """Per-output-channel multipliers of a conv or linear layer; ``bounds`` are the channels'
    :func:`accumulator_bounds` (a factor too small for a shift is then 0 where the bound proves it exact)."""
    return [
        quantize_multiplier(
            real_multiplier(input_scale, output_scale, w),
            what=f"{what} channel {c}",
            accumulator_bound=bounds[c] if bounds is not None else None,
        )
        for c, w in enumerate(weight_scales)
    ]


def product_accumulator_bound(reduction_size: int = 1, zero_points: Sequence[int] = (0, 0)) -> int:
    """The largest ``|acc|`` of a sum of ``reduction_size`` products of two int8 activations:
    ``K * max|a - z_a| * max|b - z_b|`` (``K * 128 * 128`` without zero points; ``K = 1`` for an elementwise
    product)."""
    return reduction_size * math.prod(largest_input_magnitude(z) for z in zero_points)


def product_multiplier(
    input_scales: Sequence[float],
    output_scale: float,
    *,
    what: str,
    zero_points: Sequence[int] = (0, 0),
    reduction_size: int = 1,
) -> FixedPointMultiplier:
    """The multiplier of a product of two activations, elementwise (``a * b``) or summed over ``reduction_size``
    products (a matmul): ``m = s_a * s_b / s_out``; :func:`product_accumulator_bound` bounds the accumulator (a
    factor too small for a shift is 0 where that proves it exact, as for conv)."""
    return quantize_multiplier(
        real_multiplier(input_scales[0], output_scale, input_scales[1]),
        what=what,
        accumulator_bound=product_accumulator_bound(reduction_size, zero_points),
    )


def check_product_accumulator_bound(reduction_size: int, zero_points: Sequence[int] = (0, 0), *, what: str) -> None:
    """Prove that the int32 accumulator of a matmul of two activations cannot overflow:
    ``K * 128 * 128 <= 2**31 - 1`` (that is ``K <= 131071``; with zero points, :func:`product_accumulator_bound`).

    Raises:
        QuantizationError: the bound is exceeded, naming ``what``, K and the bound.
    """
    bound = product_accumulator_bound(reduction_size, zero_points)
    if bound > INT32_MAX:
        largest = INT32_MAX // product_accumulator_bound(1, zero_points)
        raise QuantizationError(
            f"{what}: int32 accumulator may overflow; got {reduction_size} products of two int8 activations per "
            f"output, bound {bound} (allowed: <= {INT32_MAX}, that is at most {largest} products). Split the "
            "product along its reduction axis"
        )


def bias_scales(input_scale: float, weight_scales: Sequence[float]) -> list[float]:
    """float32 scales of the int32 bias (and of an int32 output): ``float32(s_in * s_w[c])``."""
    return [float32(float(input_scale) * float(w)) for w in weight_scales]


BIAS_SCALE_TOLERANCE = 1e-6
"""Relative tolerance on ``s_bias == s_in * s_w``: tools compute the float32 product in different ways."""


def bias_at_accumulator_scale(bias_scale: Sequence[float], input_scale: float, weight_scales: Sequence[float]) -> bool:
    """Whether a bias's scale (one, or one per channel) is ``s_in * s_w[c]``, so that its integers join the int32
    accumulator exactly."""
    expected = np.asarray(bias_scales(input_scale, weight_scales), dtype=np.float64)
    actual = np.asarray(bias_scale, dtype=np.float64).reshape(-1)
    if actual.size not in (1, expected.size):
        return False
    return bool(np.allclose(np.broadcast_to(actual, expected.shape), expected, rtol=BIAS_SCALE_TOLERANCE, atol=0))


def bias_joins_accumulator(values: np.ndarray, bias_scale: Sequence[float], input_scale: float, weight_scales: Sequence[float]) -> bool:
    """Whether a bias's integers ``values`` join the int32 accumulator exactly: all zeros (at any scale: a zero
    bias shared by several layers is quantized once, at one of their scales), or at ``s_in * s_w[c]``."""
    return not np.any(values) or bias_at_accumulator_scale(bias_scale, input_scale, weight_scales)


def rounding_right_shift(value: torch.Tensor, shift: torch.Tensor | int) -> torch.Tensor:
    """``value / 2**shift`` on int64, rounded to nearest with ties to even.

    ``q = value >> shift`` (floor) and the remainder ``r = value - (q << shift)`` in ``[0, 2**shift)``; the result
    is ``q + 1`` when ``r > 2**(shift-1)``, or when ``r == 2**(shift-1)`` and ``q`` is odd.
    """
    if isinstance(shift, int):
        shift = torch.tensor(shift, dtype=torch.int64, device=value.device)
    floor = torch.bitwise_right_shift(value, shift)
    remainder = value - torch.bitwise_left_shift(floor, shift)
    half = torch.bitwise_left_shift(torch.ones_like(shift), shift - 1)
    round_up = (remainder > half) | ((remainder == half) & (torch.bitwise_and(floor, 1) == 1))
    return floor + round_up.to(torch.int64)


def requantize(acc: torch.Tensor, multiplier: torch.Tensor | int, shift: torch.Tensor | int) -> torch.Tensor:
    """Scale an int32-range accumulator by ``M * 2**-n`` with one rounding (to nearest, ties to even): int64 in,
    int64 out (unsaturated). ``|acc| < 2**31`` and ``M < 2**31`` keep ``acc * M`` inside int64.
    """
    return rounding_right_shift(acc.to(torch.int64) * multiplier, shift)


FLOAT64_EXACT = 2**53
"""Every integer below this magnitude is a float64 (53-bit significand)."""


def exact_in_float64(product_bound: int) -> bool:
    """Whether a requantization ``round_half_to_even(Σ_i acc_i * M_i / 2**n)`` whose ``Σ_i |acc_i| * M_i`` is at
    most ``product_bound`` equals ``nearbyint(Σ_i float64(acc_i) * float64(M_i * 2**-n))`` for every accumulator:
    true below 2**53, where every product and partial sum is exact in float64 (docs/numerics.md section 6)."""
    return product_bound < FLOAT64_EXACT


def saturate(value: torch.Tensor, low: int, high: int, dtype: torch.dtype) -> torch.Tensor:
    """Clamp to ``[low, high]`` and cast to ``dtype``."""
    return torch.clamp(value, low, high).to(dtype)


def quantize(value: torch.Tensor, scale: float) -> torch.Tensor:
    """float -> int8: ``saturate(round_half_to_even(float32(x) / float32(s)))``, as ONNX QuantizeLinear."""
    scaled = value.to(torch.float32) / torch.tensor(scale, dtype=torch.float32)
    return saturate(torch.round(scaled), ACTIVATION_QMIN, ACTIVATION_QMAX, torch.int8)


def dequantize(value: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """int -> float32: ``float32(q) * float32(s)``, as ONNX DequantizeLinear."""
    return value.to(torch.float32) * torch.as_tensor(scale, dtype=torch.float32)


def quantize_weight(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float weight -> int8 per output channel (axis 0), the same computation as aten's fake-quantize kernels.

    ``q = saturate(round_half_to_even(w * float32(1 / s_c)), -127, 127)`` in float32, so the integer weights equal
    the ones the QAT model trained and validated with.
    """
    inverse = (1.0 / scales.to(torch.float32)).reshape(-1, *([1] * (weight.dim() - 1)))
    return saturate(torch.round(weight.to(torch.float32) * inverse), WEIGHT_QMIN, WEIGHT_QMAX, torch.int8)


def quantize_bias(bias: torch.Tensor, scales: Sequence[float], *, what: str) -> torch.Tensor:
    """float bias -> int32 at ``scales`` (from :func:`bias_scales`): ``round_half_to_even(b / s)`` in float64.

    Raises:
        QuantizationError: a bias does not fit int32, naming the channel and the values.
    """
    scaled = bias.detach().to(torch.float64) / torch.tensor(scales, dtype=torch.float64)
    rounded = torch.round(scaled)
    too_large = (rounded < INT32_MIN) | (rounded > INT32_MAX)
    if bool(too_large.any()):
        channel = int(torch.nonzero(too_large)[0])
        raise QuantizationError(
            f"{what}: bias of channel {channel} is {float(bias[channel]):.6g}, which is {float(rounded[channel]):.6g} "
            f"steps of its scale {scales[channel]:.6g} (allowed: int32). The channel's weights are almost all zero; "
            "prune the channel or give its weights a non-zero range"
        )
    return rounded.to(torch.int32)


def bias_with_input_zero_point(
    bias: np.ndarray, weights: np.ndarray, axis: int, zero_point: int, *, what: str
) -> np.ndarray:
    """The int32 bias that absorbs an input zero point: ``b'[c] = b[c] - z * Σ_k w_q[c, k]`` (docs/numerics.md
    section 9), so that ``b'[c] + Σ_k q[k] * w_q[c, k] = b[c] + Σ_k (q[k] - z) * w_q[c, k]``.

    Raises:
        QuantizationError: ``b'`` does not fit int32, naming ``what``.
    """
    sums = np.moveaxis(np.asarray(weights, dtype=np.int64), axis, 0).reshape(np.shape(weights)[axis], -1).sum(axis=1)
    folded = np.asarray(bias, dtype=np.int64).reshape(-1) - zero_point * sums
    if folded.size and (folded.min() < INT32_MIN or folded.max() > INT32_MAX):
        raise QuantizationError(
            f"{what}: the bias with the input zero point {zero_point} folded in reaches {int(np.abs(folded).max())} "
            f"(allowed: int32); the layer's weights or bias are too large for its input's zero point"
        )
    return folded.astype(np.int32)


def check_accumulator_bound(reduction_size: int, bias: torch.Tensor | np.ndarray | None, *, what: str) -> None:
    """Prove that an int32 accumulator cannot overflow: ``K * 128 * 127 + max|bias| <= 2**31 - 1``.

    ``reduction_size`` K is the number of products summed per output (in_channels / groups * kh * kw for a conv).
    With the bound met, int64 arithmetic in the integer model equals the NPU's int32 accumulator.
    """
    magnitudes = np.abs(np.asarray(bias, dtype=np.int64)) if bias is not None else np.zeros(0, dtype=np.int64)
    largest_bias = int(magnitudes.max()) if magnitudes.size else 0
    bound = reduction_size * -ACTIVATION_QMIN * WEIGHT_QMAX + largest_bias
    if bound > INT32_MAX:
        raise QuantizationError(
            f"{what}: int32 accumulator may overflow; got {reduction_size} products per output and bias up to "
            f"{largest_bias}, bound {bound} (allowed: <= {INT32_MAX}). Split the reduction into smaller layers"
        )


RESIZE_FRACTION_BITS = 11
"""F: bilinear resize weights are integers in ``[0, 2**F]``; a pixel's four weights sum to ``2**(2F)``, so the
accumulator stays below ``128 * 2**22 = 2**29`` (docs/numerics.md, "Bilinear resize")."""


@dataclass(frozen=True)
class BilinearTaps:
    """The two source indices and integer weights of each output index along one axis of a bilinear resize.

    Output ``i`` is ``weight_low[i] * x[low[i]] + weight_high[i] * x[high[i]]``, the weights summing to
    ``2**RESIZE_FRACTION_BITS``.
    """

    low: np.ndarray
    high: np.ndarray
    weight_low: np.ndarray
    weight_high: np.ndarray


def bilinear_taps(in_size: int, out_size: int, align_corners: bool) -> BilinearTaps:
    """The taps of one axis, computed exactly from integers (docs/numerics.md, "Bilinear resize").

    The source coordinate of output ``i`` is the fraction ``num / den``: ``((2i + 1) * in - out) / (2 * out)``
    clamped at 0 (ONNX ``half_pixel``, PyTorch's ``align_corners=False``), or ``i * (in - 1) / (out - 1)``
    (``align_corners``; 0 when ``out == 1``). ``low = floor(num / den)``, ``high = min(low + 1, in - 1)``,
    ``weight_high = round_half_to_even(2**F * (num - low * den) / den)``, ``weight_low = 2**F - weight_high``.

    Raises:
        QuantizationError: a size is not positive.
    """
    if in_size < 1 or out_size < 1:
        raise QuantizationError(f"bilinear resize: sizes must be positive; got {in_size} -> {out_size}")
    one = 1 << RESIZE_FRACTION_BITS
    low, high, weight_high = [], [], []
    for i in range(out_size):
        if align_corners:
            num, den = i * (in_size - 1), max(out_size - 1, 1)
        else:
            num, den = max((2 * i + 1) * in_size - out_size, 0), 2 * out_size
        index = num // den
        weight, remainder = divmod((num - index * den) * one, den)
        weight += int(2 * remainder > den or (2 * remainder == den and weight % 2 == 1))
        low.append(index)
        high.append(min(index + 1, in_size - 1))
        weight_high.append(weight)
    weights = np.asarray(weight_high, dtype=np.int64)
    return BilinearTaps(np.asarray(low, dtype=np.int64), np.asarray(high, dtype=np.int64), one - weights, weights)


def resize_align_corners(coordinate_mode: str, output_size: Sequence[int]) -> bool | None:
    """Whether an ONNX ``Resize`` (mode ``linear``) of this ``coordinate_transformation_mode`` to ``output_size``
    (H, W) computes :func:`bilinear_taps` with ``align_corners`` True or False; None when it computes neither
    (``asymmetric``, ``tf_crop_and_resize``; ``pytorch_half_pixel`` to a size of 1, whose coordinate is 0)."""
    if coordinate_mode == "half_pixel" or (coordinate_mode == "pytorch_half_pixel" and min(output_size) > 1):
        return False
    if coordinate_mode == "align_corners":
        return True
    return None


def bilinear_accumulate(value: torch.Tensor, rows: BilinearTaps, columns: BilinearTaps) -> torch.Tensor:
    """The int64 accumulator of a bilinear resize of an NCHW int8 tensor: for each output pixel the sum of its four
    source pixels times ``row weight * column weight`` (``|acc| <= 128 * 2**(2F)``)."""
    wide = value.to(torch.int64)

    def along(values: torch.Tensor, taps: BilinearTaps, axis: int) -> torch.Tensor:
        shape = [1] * values.dim()
        shape[axis] = -1
        parts = [
            values.index_select(axis, torch.from_numpy(index)) * torch.from_numpy(weight).reshape(shape)
            for index, weight in ((taps.low, taps.weight_low), (taps.high, taps.weight_high))
        ]
        return parts[0] + parts[1]

    return along(along(wide, rows, 2), columns, 3)


def bilinear_multiplier(input_scale: float, output_scale: float, *, what: str) -> FixedPointMultiplier:
    """The requantization of a bilinear resize: ``m = s_in / (s_out * 2**(2F))`` (the weights' fixed point folded
    in)."""
    count = 1 << (2 * RESIZE_FRACTION_BITS)
    return quantize_multiplier(real_multiplier(input_scale, output_scale, count=count), what=what)


def relu6_ceiling(scale: float) -> int:
    """The int8 value of 6.0 at ``scale``: ``min(127, round_half_to_even(float32(6) / float32(s)))``."""
    return min(ACTIVATION_QMAX, int(np.round(np.float32(RELU6_CEILING) / np.float32(scale))))


def clamp_levels(bounds: tuple[float, float], scale: float) -> tuple[int, int]:
    """The int8 bounds of a clamp to real ``bounds`` at ``scale`` (a standalone ReLU, ReLU6, Hardtanh), each as
    ReLU6's ceiling: ``saturate(round_half_to_even(float32(b) / float32(s)))``; an infinite bound is no bound."""

    def level(bound: float) -> int:
        if math.isinf(bound):
            return ACTIVATION_QMAX if bound > 0 else ACTIVATION_QMIN
        return min(max(int(np.round(np.float32(bound) / np.float32(scale))), ACTIVATION_QMIN), ACTIVATION_QMAX)

    return level(bounds[0]), level(bounds[1])


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _hardsigmoid(x: float) -> float:
    return min(max(x + 3.0, 0.0), 6.0) / 6.0


def _gelu(x: float) -> float:
    return 0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0)))


def _gelu_tanh(x: float) -> float:
    return 0.5 * x * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


TABLE_FUNCTIONS: OpTable[Callable[[float, float], float]] = OpTable(
    "table function in numerics.py", lambda info: info.lookup_table
)
"""The real function of each lookup-table op, in float64 (``alpha``: the op's constant, ``OpInfo.alpha``:
LeakyReLU's negative slope, ELU's alpha; unused by the others); docs/numerics.md section 7."""

TABLE_FUNCTIONS.register(Op.SIGMOID)(lambda x, alpha: _sigmoid(x))
TABLE_FUNCTIONS.register(Op.TANH)(lambda x, alpha: math.tanh(x))
TABLE_FUNCTIONS.register(Op.HARDSIGMOID)(lambda x, alpha: _hardsigmoid(x))
TABLE_FUNCTIONS.register(Op.HARDSWISH)(lambda x, alpha: x * _hardsigmoid(x))
TABLE_FUNCTIONS.register(Op.SILU)(lambda x, alpha: x * _sigmoid(x))
TABLE_FUNCTIONS.register(Op.LEAKYRELU)(lambda x, alpha: x if x >= 0 else alpha * x)
TABLE_FUNCTIONS.register(Op.GELU)(lambda x, alpha: _gelu(x))
TABLE_FUNCTIONS.register(Op.GELU_TANH)(lambda x, alpha: _gelu_tanh(x))
TABLE_FUNCTIONS.register(Op.ELU)(lambda x, alpha: x if x > 0 else alpha * math.expm1(x))

LUT_SIZE = ACTIVATION_QMAX - ACTIVATION_QMIN + 1


def lookup_table(
    op: Op, input_scale: float, output_scale: float, alpha: float = 0.0, zero_points: tuple[int, int] = (0, 0)
) -> np.ndarray:
    """The int8 table of a lookup-table ``op`` between two scales: entry ``q + 128`` is the output for input ``q``.

    ``x = float32(q - z_in) * float32(s_in)`` (the float32 product of DequantizeLinear), ``y = f(x)`` in float64
    with Python's ``math``, ``table[q + 128] = saturate(round_half_to_even(y / float64(s_out)) + z_out)``;
    ``zero_points`` are ``(z_in, z_out)``, 0 for edgeq's own activations (docs/numerics.md section 9).
    """
    scale_in, scale_out = np.float32(input_scale), float(np.float32(output_scale))
    zero_in, zero_out = zero_points
    values = [
        TABLE_FUNCTIONS[op](float(np.float32(q - zero_in) * scale_in), float(np.float32(alpha))) / scale_out
        for q in range(ACTIVATION_QMIN, ACTIVATION_QMAX + 1)
    ]
    return np.clip(np.rint(values) + zero_out, ACTIVATION_QMIN, ACTIVATION_QMAX).astype(np.int8)


def look_up(value: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """int8 -> int8 through a :func:`lookup_table`: ``table[q + 128]``."""
    return table[value.to(torch.int64) - ACTIVATION_QMIN]
