"""edgeq's integer numerics: the one implementation of ``docs/numerics.md``.

Every integer computation that edgeq performs or emits is defined in this package, once, with the names the spec
uses: the integer model calls these functions on tensors, and the compiler derives the same multipliers and shifts
from the same scales. One module per job: :mod:`.rounding` (rounding, requantization, float to int and back),
:mod:`.scales` (scales and zero points), :mod:`.multipliers` (fixed-point multipliers and accumulator bounds),
:mod:`.resize` (bilinear resize) and :mod:`.tables` (clamp levels and lookup tables). Nothing here clamps or
substitutes silently: a value outside the range the hardware can represent raises
:class:`~edgeq.errors.QuantizationError` with the values.

Conventions (see the spec for the why):

- activations: int8, symmetric, zero point 0, range [-128, 127], one float32 scale per tensor;
- weights: int8, symmetric, range [-127, 127], one float32 scale per output channel;
- bias: int32 at scale ``s_in * s_w[c]``; accumulation in int32 (proved not to overflow, see
  :func:`check_accumulator_bound`), or in int64 for a layer whose bias passes int32 (:func:`quantize_bias`);
- requantization: ``y = round(acc * M / 2**n)`` exactly in int64, with ``2**30 <= M < 2**31`` and
  ``1 <= n <= 62``: one rounding, to nearest, ties by the target's :class:`~edgeq.targets.Rounding` (to even, or
  up with ``2 <= n``: TOSA's ``SINGLE_ROUND``); ``M = 0`` when the factor is below ``2**-32`` and the accumulator
  bound proves every output rounds to 0;
- float to int8: ``round(x / s)`` in float32, ties by the same rule, then saturation (half to even: ONNX
  QuantizeLinear);
- int to float: ``float32(q) * s`` in float32 (as ONNX DequantizeLinear).
"""

from __future__ import annotations

from edgeq.numerics.multipliers import (
    ADD_HALF_UP_BITS,
    HALF_UP_MIN_SHIFT,
    MAX_SHIFT,
    MIN_SHIFT,
    MULTIPLIER_BITS,
    SMALLEST_MULTIPLIER,
    ZERO_MULTIPLIER,
    FixedPointMultiplier,
    accumulator_bounds,
    add_multipliers,
    check_accumulator_bound,
    check_product_accumulator_bound,
    check_split_requantization,
    conv_multipliers,
    folded_bias,
    min_shift,
    needs_int64_accumulator,
    product_accumulator_bound,
    product_multiplier,
    quantize_multiplier,
    quantize_multipliers,
    real_multiplier,
)
from edgeq.numerics.resize import (
    RESIZE_FRACTION_BITS,
    BilinearTaps,
    bilinear_accumulate,
    bilinear_multiplier,
    bilinear_taps,
    resize_align_corners,
)
from edgeq.numerics.rounding import (
    ACTIVATION_QMAX,
    ACTIVATION_QMIN,
    FLOAT64_EXACT,
    INT32_MAX,
    INT32_MIN,
    SPLIT_BITS,
    WEIGHT_QMAX,
    WEIGHT_QMIN,
    bias_exponents,
    dequantize,
    exact_in_float64,
    float32,
    quantize,
    quantize_bias,
    quantize_weight,
    requantize,
    round_half,
    rounding_right_shift,
    saturate,
    split_requantize,
)
from edgeq.numerics.scales import (
    BIAS_SCALE_TOLERANCE,
    SCALE_FLOOR,
    UINT8_SHIFT,
    accumulator_bias,
    bias_at_accumulator_scale,
    bias_joins_accumulator,
    bias_scales,
    int8_zero_point,
    is_power_of_two,
    largest_input_magnitude,
    scale_from_amax,
)
from edgeq.numerics.tables import (
    LUT_SIZE,
    RELU6_CEILING,
    TABLE_FUNCTIONS,
    clamp_levels,
    look_up,
    lookup_table,
    quantized_level,
    relu6_ceiling,
)

__all__ = [
    "ADD_HALF_UP_BITS",
    "HALF_UP_MIN_SHIFT",
    "add_multipliers",
    "min_shift",
    "needs_int64_accumulator",
    "round_half",
    "quantized_level",
    "ACTIVATION_QMAX",
    "ACTIVATION_QMIN",
    "BIAS_SCALE_TOLERANCE",
    "BilinearTaps",
    "FLOAT64_EXACT",
    "FixedPointMultiplier",
    "INT32_MAX",
    "INT32_MIN",
    "LUT_SIZE",
    "MAX_SHIFT",
    "MIN_SHIFT",
    "MULTIPLIER_BITS",
    "RELU6_CEILING",
    "RESIZE_FRACTION_BITS",
    "SCALE_FLOOR",
    "SMALLEST_MULTIPLIER",
    "SPLIT_BITS",
    "TABLE_FUNCTIONS",
    "UINT8_SHIFT",
    "WEIGHT_QMAX",
    "WEIGHT_QMIN",
    "ZERO_MULTIPLIER",
    "accumulator_bounds",
    "accumulator_bias",
    "bias_at_accumulator_scale",
    "bias_exponents",
    "bias_joins_accumulator",
    "bias_scales",
    "bilinear_accumulate",
    "bilinear_multiplier",
    "bilinear_taps",
    "check_accumulator_bound",
    "check_product_accumulator_bound",
    "check_split_requantization",
    "clamp_levels",
    "conv_multipliers",
    "dequantize",
    "exact_in_float64",
    "float32",
    "folded_bias",
    "int8_zero_point",
    "is_power_of_two",
    "largest_input_magnitude",
    "look_up",
    "lookup_table",
    "product_accumulator_bound",
    "product_multiplier",
    "quantize",
    "quantize_bias",
    "quantize_multiplier",
    "quantize_multipliers",
    "quantize_weight",
    "real_multiplier",
    "relu6_ceiling",
    "requantize",
    "resize_align_corners",
    "rounding_right_shift",
    "saturate",
    "split_requantize",
    "scale_from_amax",
]
