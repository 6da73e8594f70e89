"""Fixed-point multipliers and the accumulator bounds that prove them exact (docs/numerics.md sections 4 and 5)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from edgeq.errors import QuantizationError
from edgeq.numerics.rounding import ACTIVATION_QMIN, INT32_MAX, SPLIT_BITS, WEIGHT_QMAX
from edgeq.numerics.scales import largest_input_magnitude
from edgeq.targets import Rounding

MULTIPLIER_BITS = 31
"""A requantization multiplier M is a 31-bit positive integer: ``2**30 <= M < 2**31`` (or smaller when it
shares a shift with a larger one, see :func:`quantize_multipliers`)."""
MIN_SHIFT = 1
HALF_UP_MIN_SHIFT = 2
"""TOSA's RESCALE takes shifts 2..62: under half up a factor needing shift 1 is an error (docs/numerics.md 6.1)."""
MAX_SHIFT = 62
ADD_HALF_UP_BITS = 23
"""Under half up an add's largest multiplier is in ``[2**22, 2**23)``: ``128 * (M_a + M_b) < 2**31``, so TOSA's
int32 ADD of the rescaled inputs is exact (docs/numerics.md 6.1)."""
SMALLEST_MULTIPLIER = 2.0 ** (MULTIPLIER_BITS - 1 - MAX_SHIFT)
"""2**-32: smaller factors need a shift above 62 (docs/numerics.md section 4)."""


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


def min_shift(rounding: Rounding) -> int:
    """The smallest shift a requantization under ``rounding`` may use: 1, or TOSA's 2 for half up."""
    return HALF_UP_MIN_SHIFT if rounding is Rounding.HALF_UP else MIN_SHIFT


def quantize_multipliers(
    reals: Sequence[float], *, what: str, rounding: Rounding = Rounding.HALF_TO_EVEN, bits: int = MULTIPLIER_BITS
) -> tuple[list[int], int]:
    """Represent real multipliers as ``bits``-bit integers sharing one shift: ``real_i ~ M_i * 2**-n``.

    The shift is chosen so the largest multiplier uses all ``bits`` bits (``2**(bits-1) <= M_max < 2**bits``,
    31 bits unless :func:`add_multipliers` asks for fewer); each ``M_i`` is
    ``round_half_to_even(real_i * 2**n)``, which is exact in float64 before the rounding. One multiplier alone
    is the common case (:func:`quantize_multiplier`); elementwise add gives each input its own ``M_i`` with
    a shared shift, so their sum is rounded once.

    Raises:
        QuantizationError: a multiplier is not positive and finite, or needs a shift outside [1, 62] ([2, 62]
            under half up: :func:`min_shift`) (it is at least ``2**(bits-1-min_shift)``, or so small that it rounds
            to zero), naming ``what``.
    """
    if not reals or any(not (math.isfinite(r) and r > 0) for r in reals):
        raise QuantizationError(f"{what}: requantization multipliers must be positive and finite; got {list(reals)}")
    largest = max(reals)
    _, exponent = math.frexp(largest)
    shift = bits - exponent
    if round(math.ldexp(largest, shift)) == 2**bits:
        shift -= 1
    lowest = min_shift(rounding)
    under = f" under {rounding.value} rounding" if rounding is not Rounding.HALF_TO_EVEN else ""
    if not lowest <= shift <= MAX_SHIFT:
        raise QuantizationError(
            f"{what}: requantization multiplier {largest:.6g} needs shift {shift}; allowed{under}: "
            f"multipliers in [2**{bits - 1 - MAX_SHIFT}, 2**{bits - lowest}) (shift {lowest}..{MAX_SHIFT}). "
            "The scales around this op are inconsistent: check its calibration"
        )
    multipliers = [round(math.ldexp(r, shift)) for r in reals]
    if min(multipliers) == 0:
        raise QuantizationError(
            f"{what}: multiplier {min(reals):.6g} rounds to zero next to {largest:.6g} with a shared shift {shift}; "
            "the input scales differ by more than 2**31"
        )
    return multipliers, shift


def add_multipliers(factors: Sequence[float], *, what: str, rounding: Rounding = Rounding.HALF_TO_EVEN) -> tuple[list[int], int]:
    """The multipliers of an add's inputs, sharing one shift (:func:`quantize_multipliers`): 31 bits, or under half
    up :data:`ADD_HALF_UP_BITS`, the largest in ``[2**22, 2**23)`` so that TOSA adds the rescaled int8 inputs
    exactly in int32 (docs/numerics.md 6.1)."""
    bits = ADD_HALF_UP_BITS if rounding is Rounding.HALF_UP else MULTIPLIER_BITS
    return quantize_multipliers(factors, what=what, rounding=rounding, bits=bits)


def quantize_multiplier(
    real: float, *, what: str, accumulator_bound: int | None = None, rounding: Rounding = Rounding.HALF_TO_EVEN
) -> FixedPointMultiplier:
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
    (multiplier,), shift = quantize_multipliers([real], what=what, rounding=rounding)
    return FixedPointMultiplier(multiplier, shift)


def accumulator_bounds(
    weights: np.ndarray | torch.Tensor, bias: np.ndarray | torch.Tensor | None, axis: int, input_zero_point: int = 0
) -> list[int]:
    """Per output channel, the largest ``|acc|`` any int8 input can give: ``a * Σ_k |w_q[c, k]| + |b_q[c]|`` with
    ``a`` the :func:`largest_input_magnitude` (128 without a zero point).

    Args:
        weights: int8 weights; ``axis`` is the output-channel axis (0 for OIHW and for ``[out, in]``).
        bias: the bias's integers (int32, or int64 beyond it), one per channel, or None.
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
    rounding: Rounding = Rounding.HALF_TO_EVEN,
) -> list[FixedPointMultiplier]:
    """Per-output-channel multipliers of a conv or linear layer; ``bounds`` are the channels'
    :func:`accumulator_bounds` (a factor too small for a shift is then 0 where the bound proves it exact)."""
    return [
        quantize_multiplier(
            real_multiplier(input_scale, output_scale, w),
            what=f"{what} channel {c}",
            accumulator_bound=bounds[c] if bounds is not None else None,
            rounding=rounding,
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
    rounding: Rounding = Rounding.HALF_TO_EVEN,
) -> FixedPointMultiplier:
    """The multiplier of a product of two activations, elementwise (``a * b``) or summed over ``reduction_size``
    products (a matmul): ``m = s_a * s_b / s_out``; :func:`product_accumulator_bound` bounds the accumulator (a
    factor too small for a shift is 0 where that proves it exact, as for conv)."""
    return quantize_multiplier(
        real_multiplier(input_scales[0], output_scale, input_scales[1]),
        what=what,
        accumulator_bound=product_accumulator_bound(reduction_size, zero_points),
        rounding=rounding,
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


def folded_bias(bias: np.ndarray, weights: np.ndarray, axis: int, zero_point: int) -> np.ndarray:
    """``b[c] - z * Σ_k w_q[c, k]`` in int64: the bias that absorbs an input zero point (docs/numerics.md section 9)."""
    sums = np.moveaxis(np.asarray(weights, dtype=np.int64), axis, 0).reshape(np.shape(weights)[axis], -1).sum(axis=1)
    return np.asarray(bias, dtype=np.int64).reshape(-1) - zero_point * sums


def needs_int64_accumulator(bounds: Sequence[int]) -> bool:
    """Whether a conv or linear layer with these :func:`accumulator_bounds` needs an int64 accumulator: some
    channel's bound exceeds int32 (a third-party file's bias quantized at a tiny ``s_in * s_w``; docs/numerics.md
    section 5). Otherwise every step of its int32 accumulation is exact: the sum of products
    ``|Σ_k q[k] * w_q[c, k]| <= 128 * Σ_k |w_q[c, k]|`` and the :func:`folded_bias` ``|b - z * Σ_k w_q[c, k]|``
    are both at most the bound, as ``max|q - z| >= 128`` for every int8 zero point."""
    return max(bounds, default=0) > INT32_MAX


def check_split_requantization(bounds: Sequence[int], multipliers: Sequence[FixedPointMultiplier], *, what: str) -> None:
    """Prove that :func:`~edgeq.numerics.rounding.split_requantize` is exact for int64 accumulators bounded by
    ``bounds`` (one per multiplier): ``(|acc| >> k + 1) * M < 2**61`` with ``k = min(n, 31)`` (docs/numerics.md
    section 5).

    Raises:
        QuantizationError: an accumulator bound beyond ``2**61 * 2**k / M``, naming ``what``.
    """
    for bound, m in zip(bounds, multipliers, strict=True):
        if ((bound >> min(m.shift, SPLIT_BITS)) + 1) * m.multiplier >= 2**61:
            raise QuantizationError(
                f"{what}: int64 accumulator up to {bound} times multiplier {m.multiplier} * 2**-{m.shift} is beyond the "
                "requantization's range; the scales around this layer are inconsistent: check its calibration"
            )


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
