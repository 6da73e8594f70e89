"""Integer arithmetic as Relax expressions: the requantization, rounding, saturation and int8 x int8 -> int32
accumulation of docs/numerics.md, built by the integer lowering (:mod:`edgeq.compile.lowering`) and by the
compiler's int32 heads (:mod:`edgeq.compile.codegen`).

The requantization is computed in float64 where :func:`edgeq.numerics.exact_in_float64` proves it exact
(docs/numerics.md section 6), else in int64, with the multipliers and shifts the integer model uses, and rounds ties
by the target's rule: :func:`lowering_rounding`, which :func:`edgeq.compile.lower_integer.lower_to_integer` sets for
the rules it runs (:func:`rounding_rule`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np
from tvm import relax
from tvm.relax import op as R

from edgeq.errors import QuantizationError
from edgeq.numerics import (
    ACTIVATION_QMAX,
    ACTIVATION_QMIN,
    INT32_MAX,
    SPLIT_BITS,
    FixedPointMultiplier,
    accumulator_bounds,
    check_split_requantization,
    exact_in_float64,
    folded_bias,
    largest_input_magnitude,
    needs_int64_accumulator,
    quantize_multiplier,
    real_multiplier,
)
from edgeq.targets import Rounding

_ROUNDING: ContextVar[Rounding] = ContextVar("edgeq_lowering_rounding", default=Rounding.HALF_TO_EVEN)


@contextmanager
def rounding_rule(rounding: Rounding) -> Iterator[None]:
    """Within the block, the arithmetic written here rounds ties by ``rounding`` (the compiled target's rule)."""
    token = _ROUNDING.set(rounding)
    try:
        yield
    finally:
        _ROUNDING.reset(token)


def lowering_rounding() -> Rounding:
    """The rounding rule of the lowering in progress (:func:`rounding_rule`; half to even outside one)."""
    return _ROUNDING.get()


@dataclass(frozen=True)
class Activation:
    """An int8 activation's quantization: ``real = (q - zero_point) * scale``."""

    scale: float
    zero_point: int = 0


def _i64(values: Sequence[int] | np.ndarray, shape: Sequence[int]) -> relax.Constant:
    return relax.const(np.asarray(values, dtype=np.int64).reshape(shape), "int64")


def channel_shape(rank: int, axis: int, channels: int) -> list[int]:
    """The shape of per-channel constants on ``axis`` of a tensor of ``rank`` axes (ones elsewhere)."""
    shape = [1] * rank
    shape[axis] = channels
    return shape


def _round_shift(product: relax.Expr, shifts: Sequence[int], shape: Sequence[int]) -> relax.Expr:
    """``round(product / 2**n)`` on int64, as ``edgeq.numerics.rounding_right_shift``: half up
    ``(p + 2**(n-1)) >> n``; half to even in the kernels' epilogue form ``(p + 2**(n-1) - 1 + ((p >> n) & 1)) >> n``
    (equal for ``1 <= n``, ``|p| < 2**62``)."""
    shift = _i64(shifts, shape)
    if lowering_rounding() is Rounding.HALF_UP:
        return R.right_shift(R.add(product, _i64([1 << (n - 1) for n in shifts], shape)), shift)
    odd = R.bitwise_and(R.right_shift(product, shift), relax.const(1, "int64"))
    return R.right_shift(R.add(R.add(product, _i64([(1 << (n - 1)) - 1 for n in shifts], shape)), odd), shift)


def saturate(
    value: relax.Expr, zero_point: int = 0, low: int = ACTIVATION_QMIN, high: int = ACTIVATION_QMAX, dtype: str = "int64"
) -> relax.Expr:
    """``saturate(value + zero_point, low, high)`` as int8 (the output zero point is added after rounding, to a
    ``dtype`` ``value``: int64, or float64 holding an integer)."""
    if zero_point:
        value = R.add(value, relax.const(zero_point, dtype))
    return R.astype(R.clip(value, low, high), "int8")


def centred(value: relax.Expr, zero_point: int) -> relax.Expr:
    """An int8 activation minus its zero point, as int32 (``q - z``)."""
    wide = R.astype(value, "int32")
    return R.subtract(wide, relax.const(zero_point, "int32")) if zero_point else wide


Term = tuple[relax.Expr, Sequence[FixedPointMultiplier]]
"""An integer tensor and the multipliers it is scaled by (one, or one per channel)."""


INT32_EXACT = 2**31 - 2**8
"""Rounded requantizations below this convert to int32 exactly, and stay in int32 when a zero point is added."""


def rounded_in_float64(terms: Sequence[Term], shape: Sequence[int], zero_point: int, largest: int) -> relax.Expr:
    """``saturate(round(Σ float64(value) * float64(M * 2**-n)) + zero_point)`` as int8, each term's multipliers
    shaped as ``shape``: the requantization where :func:`edgeq.numerics.exact_in_float64` proves it exact
    (docs/numerics.md section 6); ``round`` is ``nearbyint`` (half to even) or ``floor(p + 1/2)`` (half up). A
    convert, a multiply and a round, where the int64 form needs a 64-bit shift that AVX2 lacks. ``largest``: a bound
    on ``|Σ value * M * 2**-n|``; below :data:`INT32_EXACT` the rounded value converts to int32 exactly, so the zero
    point and the clamp take twice the vector lanes of float64."""
    total = None
    for value, multipliers in terms:
        factors = np.array([m.real for m in multipliers], np.float64).reshape(shape)
        term = R.multiply(R.astype(value, "float64"), relax.const(factors, "float64"))
        total = term if total is None else R.add(total, term)
    if lowering_rounding() is Rounding.HALF_UP:
        rounded = R.floor(R.add(total, relax.const(0.5, "float64")))
    else:
        rounded = R.round(total)
    if largest < INT32_EXACT:
        return saturate(R.astype(rounded, "int32"), zero_point, dtype="int32")
    return saturate(rounded, zero_point, dtype="float64")


def largest_rounded(bounds: Sequence[int], multipliers: Sequence[FixedPointMultiplier]) -> int:
    """A bound on ``|acc * M * 2**-n|`` over channels, for accumulators bounded by ``bounds`` (per channel)."""
    return max((bound * m.multiplier >> m.shift) + 1 for bound, m in zip(bounds, multipliers, strict=True))


def requantize(
    acc: relax.Expr,
    multipliers: Sequence[FixedPointMultiplier],
    rank: int,
    axis: int,
    zero_point: int = 0,
    bounds: Sequence[int] | None = None,
) -> relax.Expr:
    """int32/int64 accumulator -> int8 (``edgeq.numerics.requantize``, the output zero point, saturation), per
    channel on ``axis``; in float64 where ``bounds``, the largest ``|acc|`` each multiplier scales (one per channel,
    or one), prove that exact for every channel, else in int64 (by halves of the accumulator where ``acc * M`` can
    pass 2**62: :func:`_split_round_shift`)."""
    shape = channel_shape(rank, axis, len(multipliers)) if len(multipliers) > 1 else [1] * rank
    rule = lowering_rounding()
    if bounds is not None and all(
        exact_in_float64(bound * m.multiplier, m.shift, rule) for bound, m in zip(bounds, multipliers, strict=True)
    ):
        return rounded_in_float64([(acc, multipliers)], shape, zero_point, largest_rounded(bounds, multipliers))
    if bounds is not None and any(bound * m.multiplier >= PRODUCT_LIMIT for bound, m in zip(bounds, multipliers, strict=True)):
        return saturate(_split_round_shift(acc, multipliers, shape, bounds), zero_point)
    # the multipliers fit int32: kernel selection keeps them so, for a 32 x 32 -> 64-bit multiply (vpmuldq, smull)
    product = R.multiply(R.astype(acc, "int64"), _i64([m.multiplier for m in multipliers], shape))
    return saturate(_round_shift(product, [m.shift for m in multipliers], shape), zero_point)


PRODUCT_LIMIT = 2**62
"""``|acc * M|`` below this: :func:`_round_shift` computes ``round(acc * M / 2**n)`` in int64."""

def _split_round_shift(
    acc: relax.Expr, multipliers: Sequence[FixedPointMultiplier], shape: Sequence[int], bounds: Sequence[int]
) -> relax.Expr:
    """``round(acc * M / 2**n)`` (ties by the lowering's rule) of an int64 accumulator whose product with ``M`` may
    exceed int64 (docs/numerics.md section 5): with ``k = min(n, 31)``, ``acc = h * 2**k + l`` (``0 <= l < 2**k``)
    and ``floor((acc * M + c) / 2**n) = (h * M + ((l * M + c) >> k)) >> (n - k)`` for any integer ``c``; half up
    adds ``c = 2**(n-1)``, half to even ``2**(n-1) - 1 + (floor(acc * M / 2**n) & 1)``, as :func:`_round_shift`.

    Raises:
        QuantizationError: ``|h * M|`` could reach 2**61 (:func:`edgeq.numerics.check_split_requantization`).
    """
    check_split_requantization(bounds, multipliers, what="split requantization")
    low_bits = [min(m.shift, SPLIT_BITS) for m in multipliers]
    k, factor = _i64(low_bits, shape), _i64([m.multiplier for m in multipliers], shape)
    rest = _i64([m.shift - bits for m, bits in zip(multipliers, low_bits, strict=True)], shape)
    high = R.right_shift(acc, k)
    low = R.subtract(acc, R.left_shift(high, k))
    high_product, low_product = R.multiply(high, factor), R.multiply(low, factor)

    def floor_of(added: relax.Expr) -> relax.Expr:
        return R.right_shift(R.add(high_product, R.right_shift(R.add(low_product, added), k)), rest)

    halves = [1 << (m.shift - 1) for m in multipliers]
    if lowering_rounding() is Rounding.HALF_UP:
        return floor_of(_i64(halves, shape))
    odd = R.bitwise_and(floor_of(relax.const(0, "int64")), relax.const(1, "int64"))
    return floor_of(R.add(_i64([half - 1 for half in halves], shape), odd))


def requantize_sum(terms: Sequence[tuple[relax.Expr, FixedPointMultiplier, int]], rank: int, zero_point: int = 0) -> relax.Expr:
    """``saturate(round(Σ_i value_i * M_i / 2**n) + zero_point)`` as int8 for per-tensor terms ``(value, M_i * 2**-n,
    largest |value|)`` sharing ``n`` (an add): in float64 where :func:`edgeq.numerics.exact_in_float64` proves it
    exact (always under half to even: ``Σ |value_i| * M_i < 2 * 2**8 * 2**31``), else in int64."""
    shape = [1] * rank
    shift = terms[0][1].shift
    if exact_in_float64(sum(bound * m.multiplier for _, m, bound in terms), shift, lowering_rounding()):
        largest = sum(largest_rounded([bound], [m]) for _, m, bound in terms)
        return rounded_in_float64([(value, [m]) for value, m, _ in terms], shape, zero_point, largest)
    total = None
    for value, m, _ in terms:
        term = R.multiply(R.astype(value, "int64"), _i64([m.multiplier], shape))
        total = term if total is None else R.add(total, term)
    return saturate(_round_shift(total, [shift], shape), zero_point)


def rescale(value: relax.Expr, source: Activation, target: Activation, rank: int, what: str) -> relax.Expr:
    """An int8 tensor brought to another quantization (the identity, skipped, when they are equal)."""
    if source == target:
        return value
    multiplier = quantize_multiplier(real_multiplier(source.scale, target.scale), what=what, rounding=lowering_rounding())
    return requantize(centred(value, source.zero_point), [multiplier], rank, 0, target.zero_point, [largest_input_magnitude(source.zero_point)])


@dataclass(frozen=True)
class Conv2dSettings:
    """Stride, padding (top, left, bottom, right), dilation and groups of an NCHW / OIHW convolution."""

    strides: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int


def integer_accumulator(
    source: relax.Expr,
    weights: np.ndarray,
    bias: np.ndarray,
    conv: Conv2dSettings | None = None,
    zero_point: int = 0,
    *,
    what: str = "accumulator",
    allow_int64: bool = False,
) -> relax.Expr:
    """int8 x int8 -> int32 accumulation plus the int32 bias (docs/numerics.md section 5), or int64 for a layer
    whose int32 accumulator could overflow (:func:`edgeq.numerics.needs_int64_accumulator`) when ``allow_int64``.

    ``weights`` are OIHW for a convolution (``conv`` given), else ``[in_features, out_features]`` for a matmul
    over the last axis of ``source``. An input ``zero_point`` (section 9) folds into the bias, and a convolution
    then pads with the zero point (the real 0) instead of 0.

    Raises:
        QuantizationError: the int32 accumulator could overflow and ``allow_int64`` is false (an int32 output),
            naming ``what``.
    """
    axis = 0 if conv is not None else 1
    bound = max(accumulator_bounds(weights, bias, axis, zero_point))
    dtype = "int64" if needs_int64_accumulator([bound]) else "int32"
    if dtype == "int64" and not allow_int64:
        raise QuantizationError(
            f"{what}: int32 accumulator may overflow; bound {bound} (allowed: <= {INT32_MAX}), and an int32 output "
            "cannot widen. Split the reduction into smaller layers"
        )
    bias = folded_bias(bias, weights, axis, zero_point)
    if conv is not None:
        source, padding = padded(source, conv.padding, zero_point)
        acc = R.nn.conv2d(
            source, relax.const(weights, "int8"), conv.strides, padding, conv.dilation, conv.groups,
            "NCHW", "OIHW", "NCHW", dtype,
        )
        shape = [1, -1, 1, 1]
    else:
        acc = R.matmul(source, relax.const(np.ascontiguousarray(weights), "int8"), out_dtype=dtype)
        shape = [-1]
    if dtype == "int64":
        return R.add(acc, relax.const(bias.reshape(shape), "int64"))
    return _wrapping_add(acc, relax.const(bias.astype(np.int32).reshape(shape), "int32"))


def _wrapping_add(left: relax.Expr, right: relax.Expr) -> relax.Expr:
    """``left + right`` on int32 that cannot overflow (the accumulator bound), added as uint32: LLVM then keeps the
    sum a sign-extended 32-bit value where it is widened (a signed add, marked as never overflowing, becomes an
    add of two 64-bit values), so the requantization multiplies 32 x 32 -> 64 bits."""
    wrapped = R.add(R.astype(left, "uint32"), R.astype(right, "uint32"))
    return R.astype(wrapped, "int32")


def padded(source: relax.Expr, padding: Sequence[int], zero_point: int) -> tuple[relax.Expr, Sequence[int]]:
    """An NCHW int8 input padded with its zero point, and the padding left to the op (zeros: none left); the
    input itself when the zero point is 0 or there is no padding."""
    if not zero_point or not any(int(p) for p in padding):
        return source, padding
    top, left, bottom, right = (int(p) for p in padding)
    return R.nn.pad(source, [0, 0, 0, 0, top, bottom, left, right], "constant", float(zero_point)), [0, 0, 0, 0]
