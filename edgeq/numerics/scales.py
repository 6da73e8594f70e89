"""Scales and zero points: how a tensor's integers map to real numbers (docs/numerics.md sections 2, 3 and 9)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from edgeq.numerics.rounding import ACTIVATION_QMAX, ACTIVATION_QMIN, float32
from edgeq.targets import ScaleRule

SCALE_FLOOR = float(np.finfo(np.float32).eps)
"""The smallest scale an observer produces (2**-23): an all-zero tensor still gets a usable scale."""


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


def accumulator_bias(values: np.ndarray, bias_scale: Sequence[float], input_scale: float, weight_scales: Sequence[float]) -> np.ndarray | None:
    """A bias's integers ``values`` as int64 integers at ``s_in * s_w[c]``, the accumulator's scale, or None when
    they do not join it exactly. They do when all zeros (at any scale: a zero bias shared by several layers is
    quantized once, at one of their scales), at ``s_in * s_w[c]``, or per channel at ``s_in * s_w[c] * 2**k`` for
    an integer ``k >= 1``, which means the integers ``b * 2**k`` (edgeq writes a bias beyond int32 so,
    :func:`~edgeq.numerics.rounding.bias_exponents`)."""
    values = np.asarray(values).reshape(-1)
    expected = np.asarray(bias_scales(input_scale, weight_scales), dtype=np.float64).reshape(-1)
    if expected.size == 1:  # per-tensor weights: one accumulator scale for every channel of the bias
        expected = np.broadcast_to(expected, values.shape)
    if not np.any(values):
        return np.zeros(expected.size, dtype=np.int64)
    actual = np.asarray(bias_scale, dtype=np.float64).reshape(-1)
    if actual.size not in (1, expected.size) or values.size not in (1, expected.size):
        return None
    ratios = np.broadcast_to(actual, expected.shape) / expected
    if not np.all(ratios > 0):
        return None
    exponents = np.maximum(np.round(np.log2(ratios)), 0).astype(np.int64)
    if not np.allclose(ratios, np.ldexp(1.0, exponents), rtol=BIAS_SCALE_TOLERANCE, atol=0):
        return None
    return np.broadcast_to(values.astype(np.int64), expected.shape) << exponents


def bias_joins_accumulator(values: np.ndarray, bias_scale: Sequence[float], input_scale: float, weight_scales: Sequence[float]) -> bool:
    """Whether a bias's integers ``values`` join the accumulator exactly (:func:`accumulator_bias`)."""
    return accumulator_bias(values, bias_scale, input_scale, weight_scales) is not None
