"""Rounding and requantization, and the conversions between float and int (docs/numerics.md sections 3 and 6).

The integer ranges of activations, weights and accumulators are named here; every rounding of a value to the integer
grid is one of these functions, ties decided by the target's :class:`~edgeq.targets.Rounding` where the spec says
the target's rule applies (requantization, quantizing a float input, activation fake quantization, table entries),
half to even for the constants (weights, biases)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from edgeq.errors import QuantizationError
from edgeq.targets import Rounding

ACTIVATION_QMIN = -128
ACTIVATION_QMAX = 127
WEIGHT_QMIN = -127
WEIGHT_QMAX = 127
INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1


def float32(value: float) -> float:
    """Round a Python float to the nearest float32 and return it as a Python float."""
    return float(np.float32(value))


def round_half(value: torch.Tensor, rounding: Rounding = Rounding.HALF_TO_EVEN) -> torch.Tensor:
    """Float values rounded to the nearest integer, ties by the target's ``rounding``, exactly: ``nearbyint`` for
    half to even; ``f + (x - f >= 1/2)`` with ``f = floor(x)`` for half up (``x - f`` is exact for a float ``x``,
    where ``floor(x + 1/2)`` can round the sum up: ``0.5 - 2**-25`` in float32)."""
    if rounding is Rounding.HALF_TO_EVEN:
        return torch.round(value)
    floor = torch.floor(value)
    return floor + (value - floor >= 0.5).to(value.dtype)


def rounding_right_shift(value: torch.Tensor, shift: torch.Tensor | int, rounding: Rounding = Rounding.HALF_TO_EVEN) -> torch.Tensor:
    """``value / 2**shift`` on int64, rounded to nearest, ties by ``rounding``.

    Half to even: ``q = value >> shift`` (floor) and the remainder ``r = value - (q << shift)`` in
    ``[0, 2**shift)``; the result is ``q + 1`` when ``r > 2**(shift-1)``, or when ``r == 2**(shift-1)`` and ``q`` is
    odd. Half up (TOSA's SINGLE_ROUND): ``(value + 2**(shift-1)) >> shift``, exact in int64 for
    ``|value| < 2**62`` and ``shift <= 62``.
    """
    if isinstance(shift, int):
        shift = torch.tensor(shift, dtype=torch.int64, device=value.device)
    half = torch.bitwise_left_shift(torch.ones_like(shift), shift - 1)
    if rounding is Rounding.HALF_UP:
        return torch.bitwise_right_shift(value + half, shift)
    floor = torch.bitwise_right_shift(value, shift)
    remainder = value - torch.bitwise_left_shift(floor, shift)
    round_up = (remainder > half) | ((remainder == half) & (torch.bitwise_and(floor, 1) == 1))
    return floor + round_up.to(torch.int64)


def requantize(
    acc: torch.Tensor, multiplier: torch.Tensor | int, shift: torch.Tensor | int, rounding: Rounding = Rounding.HALF_TO_EVEN
) -> torch.Tensor:
    """Scale an int32-range accumulator by ``M * 2**-n`` with one rounding (to nearest, ties by ``rounding``):
    int64 in, int64 out (unsaturated). ``|acc| < 2**31`` and ``M < 2**31`` keep ``acc * M`` inside int64; a wider
    (int64) accumulator needs :func:`split_requantize`.
    """
    return rounding_right_shift(acc.to(torch.int64) * multiplier, shift, rounding)


def split_requantize(
    acc: torch.Tensor, multiplier: torch.Tensor | int, shift: torch.Tensor | int, rounding: Rounding = Rounding.HALF_TO_EVEN
) -> torch.Tensor:
    """``round(acc * M / 2**n)`` of an int64 accumulator whose product with ``M`` may pass int64 (docs/numerics.md
    section 5): with ``k = min(n, 31)`` and ``acc = h * 2**k + l`` (``0 <= l < 2**k``),
    ``floor((acc * M + c) / 2**n) = (h * M + ((l * M + c) >> k)) >> (n - k)``; half up adds ``c = 2**(n-1)``, half
    to even ``c = 2**(n-1) - 1 + (floor(acc * M / 2**n) & 1)``. Exact while ``|h * M| < 2**61``, which
    :func:`~edgeq.numerics.multipliers.check_split_requantization` proves from the accumulator's bound.
    """
    acc = acc.to(torch.int64)
    multiplier = torch.as_tensor(multiplier, dtype=torch.int64)
    shift = torch.as_tensor(shift, dtype=torch.int64)
    low_bits = torch.clamp(shift, max=SPLIT_BITS)
    high = acc >> low_bits
    high_product, low_product = high * multiplier, (acc - (high << low_bits)) * multiplier

    def floor_of(added: torch.Tensor) -> torch.Tensor:
        return (high_product + ((low_product + added) >> low_bits)) >> (shift - low_bits)

    half = torch.ones_like(shift) << (shift - 1)
    if rounding is Rounding.HALF_UP:
        return floor_of(half)
    return floor_of(half - 1 + (floor_of(torch.zeros_like(half)) & 1))


FLOAT64_EXACT = 2**53
"""Every integer below this magnitude is a float64 (53-bit significand)."""


def exact_in_float64(product_bound: int, shift: int, rounding: Rounding = Rounding.HALF_TO_EVEN) -> bool:
    """Whether a requantization ``round(Σ_i acc_i * M_i / 2**n)`` whose ``Σ_i |acc_i| * M_i`` is at most
    ``product_bound`` is computed exactly by the kernels' float64 form for every accumulator (docs/numerics.md
    section 6): ``nearbyint(p)`` of ``p = Σ_i float64(acc_i) * float64(M_i * 2**-n)`` for half to even, true below
    2**53, where every product and partial sum is exact; ``floor(p + 1/2)`` for half up, true when
    ``product_bound + 2**(n-1) < 2**53``, where ``p + 1/2`` is exact too."""
    if rounding is Rounding.HALF_UP:
        return product_bound + (1 << (shift - 1)) < FLOAT64_EXACT
    return product_bound < FLOAT64_EXACT


def saturate(value: torch.Tensor, low: int, high: int, dtype: torch.dtype) -> torch.Tensor:
    """Clamp to ``[low, high]`` and cast to ``dtype``."""
    return torch.clamp(value, low, high).to(dtype)


def quantize(value: torch.Tensor, scale: float, rounding: Rounding = Rounding.HALF_TO_EVEN) -> torch.Tensor:
    """float -> int8: ``saturate(round(float32(x) / float32(s)))``, ties by ``rounding`` (half to even: ONNX
    QuantizeLinear)."""
    scaled = value.to(torch.float32) / torch.tensor(scale, dtype=torch.float32)
    return saturate(round_half(scaled, rounding), ACTIVATION_QMIN, ACTIVATION_QMAX, torch.int8)


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


SPLIT_BITS = 31
"""The low part of an int64 accumulator in :func:`split_requantize`: ``l < 2**31``, so ``l * M < 2**62``."""

WIDE_BIAS_LIMIT = 2.0**62
"""A bias beyond int32 is at most this many steps of its scale, so that its int64 integers leave room for the sum of
products in the int64 accumulator."""


def quantize_bias(bias: torch.Tensor, scales: Sequence[float], *, what: str) -> torch.Tensor:
    """float bias -> int64 integers at ``scales`` (from :func:`bias_scales`): ``round_half_to_even(b / s)`` in
    float64 where that fits int32; beyond int32 (a channel whose ``s_in * s_w[c]`` is tiny for its bias),
    ``round_half_to_even(b / (s * 2**k)) * 2**k`` with the smallest ``k`` that fits the rounded value in int32, so
    that a QDQ file holds it as int32 integers at the scale ``s * 2**k`` (:func:`bias_exponents`). The layer then
    needs an int64 accumulator (docs/numerics.md sections 3 and 5).

    Raises:
        QuantizationError: a bias is not finite, or is ``2**62`` steps of its scale or more, naming the channel.
    """
    scaled = bias.detach().to(torch.float64) / torch.tensor(scales, dtype=torch.float64)
    beyond = ~torch.isfinite(scaled) | (scaled.abs() >= WIDE_BIAS_LIMIT)
    if bool(beyond.any()):
        channel = int(torch.nonzero(beyond)[0])
        raise QuantizationError(
            f"{what}: bias of channel {channel} is {float(bias[channel]):.6g}, which is {float(scaled[channel]):.6g} "
            f"steps of its scale {scales[channel]:.6g} (allowed: below 2**62). The channel's weights are almost all "
            "zero; prune the channel or give its weights a non-zero range"
        )
    exponents = torch.zeros_like(scaled, dtype=torch.int64)
    while True:
        rounded = torch.round(torch.ldexp(scaled, -exponents))
        too_large = rounded.abs() > INT32_MAX
        if not bool(too_large.any()):
            return rounded.to(torch.int64) << exponents
        exponents = exponents + too_large.to(torch.int64)


def bias_exponents(bias: np.ndarray | torch.Tensor) -> np.ndarray:
    """Per channel, the smallest ``k >= 0`` whose ``b >> k`` fits int32, for int64 bias integers from
    :func:`quantize_bias`: the QDQ file writes ``b >> k`` at the scale ``s_in * s_w[c] * 2**k``.

    Raises:
        QuantizationError: a bias is not a multiple of its ``2**k`` (not from :func:`quantize_bias`).
    """
    values = np.asarray(bias, dtype=np.int64).reshape(-1)
    exponents = np.zeros(values.shape, dtype=np.int64)
    while np.any(np.abs(values >> exponents) > INT32_MAX):
        exponents += np.abs(values >> exponents) > INT32_MAX
    if np.any((values >> exponents) << exponents != values):
        raise QuantizationError(f"bias {values.tolist()[:4]} beyond int32 is not a multiple of 2**{exponents.tolist()[:4]}")
    return exponents
