"""Bilinear resize in integers: the fixed-point taps and their requantization (docs/numerics.md, "Bilinear resize")."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from edgeq.errors import QuantizationError
from edgeq.numerics.multipliers import FixedPointMultiplier, quantize_multiplier, real_multiplier
from edgeq.targets import Rounding

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


def bilinear_multiplier(
    input_scale: float, output_scale: float, *, what: str, rounding: Rounding = Rounding.HALF_TO_EVEN
) -> FixedPointMultiplier:
    """The requantization of a bilinear resize: ``m = s_in / (s_out * 2**(2F))`` (the weights' fixed point folded
    in)."""
    count = 1 << (2 * RESIZE_FRACTION_BITS)
    return quantize_multiplier(real_multiplier(input_scale, output_scale, count=count), what=what, rounding=rounding)
