"""The integer lowering: a Relax pass that turns QDQ units into the integer arithmetic of docs/numerics.md.

TVM's ONNX frontend imports a QDQ graph as ``quantize(op(dequantize(q), dequantize(weights)))``: the op runs in
float and only emulates int8. This pass rewrites every such unit whose quantization fits edgeq's numerics (int8
activations with per-tensor scales; int8 weights with zero point 0; an int32 bias at ``s_in * s_w``) into
integer Relax ops: an int8 convolution into an int32 accumulator, the int32 bias, and the fixed-point
requantization of :mod:`edgeq.numerics` with the same multipliers and shifts the integer model uses, computed in
float64 where that is exact (docs/numerics.md section 6), else in int64.
Activations with zero points (third-party files; uint8 ones arrive as int8, :mod:`.int8_activations`) get the
exact corrections of docs/numerics.md section 9; edgeq's own files have none, and then every correction is
absent. A unit that does not fit (uint8 or asymmetric weights, a bias at another scale, an op edgeq does not
know) is left as TVM imported it: TVM then computes it in float with its own quantize/dequantize, zero points
included. The float ops of rewritten units become dead and ``DeadCodeElimination`` removes them.

Each rule is a dataflow pattern (``tvm.relax.dpl``) and a rewriter; a rewriter that finds the match does not fit
returns the matched call unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax
from tvm.relax import op as R
from tvm.relax.dpl import DFPattern, is_const, is_op, is_tuple_get_item, rewrite_call, wildcard

from edgeq.numerics import (
    ACTIVATION_QMAX,
    ACTIVATION_QMIN,
    BilinearTaps,
    FixedPointMultiplier,
    accumulator_bounds,
    bias_joins_accumulator,
    bias_with_input_zero_point,
    bilinear_multiplier,
    bilinear_taps,
    check_accumulator_bound,
    check_product_accumulator_bound,
    conv_multipliers,
    exact_in_float64,
    largest_input_magnitude,
    lookup_table,
    product_accumulator_bound,
    product_multiplier,
    quantize_multiplier,
    quantize_multipliers,
    real_multiplier,
    resize_align_corners,
)
from edgeq.ops import LOOKUP_TABLE_OPS, Op, OpTable

# ---- reading constants and quantization parameters --------------------------------------------------------------


def _constant(expr: relax.Expr) -> np.ndarray | None:
    value = getattr(expr, "value", None)
    return value.numpy() if hasattr(value, "numpy") else None


@dataclass(frozen=True)
class _Quant:
    """The parameters of one quantize/dequantize call, when they are constants."""

    scales: np.ndarray
    zero_points: np.ndarray
    dtype: str
    axis: int

    @property
    def activation(self) -> "_Activation | None":
        """Scale and zero point of an int8 per-tensor quantization (``None`` for anything else)."""
        if self.dtype == "int8" and self.scales.size == 1:
            return _Activation(float(self.scales.reshape(())), int(self.zero_points.reshape(())))
        return None


@dataclass(frozen=True)
class _Activation:
    """An int8 activation's quantization: ``real = (q - zero_point) * scale``."""

    scale: float
    zero_point: int = 0


def _quant(call: relax.Call, quantized: relax.Expr) -> _Quant | None:
    scales, zero_points = _constant(call.args[1]), _constant(call.args[2])
    if scales is None or zero_points is None:
        return None
    dtype = str(call.ty.dtype if call.op.name == "relax.quantize" else quantized.ty.dtype)
    return _Quant(scales.astype(np.float32).reshape(-1), zero_points.reshape(-1), dtype, int(call.attrs.axis))


# ---- integer building blocks (Relax expressions) ----------------------------------------------------------------


def _i64(values: Sequence[int] | np.ndarray, shape: Sequence[int]) -> relax.Constant:
    return relax.const(np.asarray(values, dtype=np.int64).reshape(shape), "int64")


def _channel_shape(rank: int, axis: int, channels: int) -> list[int]:
    shape = [1] * rank
    shape[axis] = channels
    return shape


def _round_shift(product: relax.Expr, shifts: Sequence[int], shape: Sequence[int]) -> relax.Expr:
    """``round_half_to_even(product / 2**n)`` on int64, as ``edgeq.numerics.rounding_right_shift``, in the
    kernels' epilogue form ``(p + 2**(n-1) - 1 + ((p >> n) & 1)) >> n`` (equal for ``1 <= n``, ``|p| < 2**62``)."""
    shift = _i64(shifts, shape)
    odd = R.bitwise_and(R.right_shift(product, shift), relax.const(1, "int64"))
    return R.right_shift(R.add(R.add(product, _i64([(1 << (n - 1)) - 1 for n in shifts], shape)), odd), shift)


def _saturate(
    value: relax.Expr, zero_point: int = 0, low: int = ACTIVATION_QMIN, high: int = ACTIVATION_QMAX, dtype: str = "int64"
) -> relax.Expr:
    """``saturate(value + zero_point, low, high)`` as int8 (the output zero point is added after rounding, to a
    ``dtype`` ``value``: int64, or float64 holding an integer)."""
    if zero_point:
        value = R.add(value, relax.const(zero_point, dtype))
    return R.astype(R.clip(value, low, high), "int8")


def _centred(value: relax.Expr, zero_point: int) -> relax.Expr:
    """An int8 activation minus its zero point, as int32 (``q - z``)."""
    wide = R.astype(value, "int32")
    return R.subtract(wide, relax.const(zero_point, "int32")) if zero_point else wide


Term = tuple[relax.Expr, Sequence[FixedPointMultiplier]]
"""An integer tensor and the multipliers it is scaled by (one, or one per channel)."""


INT32_EXACT = 2**31 - 2**8
"""Rounded requantizations below this convert to int32 exactly, and stay in int32 when a zero point is added."""


def _rounded_in_float64(terms: Sequence[Term], shape: Sequence[int], zero_point: int, largest: int) -> relax.Expr:
    """``saturate(nearbyint(Σ float64(value) * float64(M * 2**-n)) + zero_point)`` as int8, each term's multipliers
    shaped as ``shape``: the requantization where :func:`edgeq.numerics.exact_in_float64` proves it exact
    (docs/numerics.md section 6). A convert, a multiply and a round, where the int64 form needs a 64-bit shift
    that AVX2 lacks. ``largest``: a bound on ``|Σ value * M * 2**-n|``; below :data:`INT32_EXACT` the rounded
    value converts to int32 exactly, so the zero point and the clamp take twice the vector lanes of float64."""
    total = None
    for value, multipliers in terms:
        factors = np.array([m.real for m in multipliers], np.float64).reshape(shape)
        term = R.multiply(R.astype(value, "float64"), relax.const(factors, "float64"))
        total = term if total is None else R.add(total, term)
    if largest < INT32_EXACT:
        return _saturate(R.astype(R.round(total), "int32"), zero_point, dtype="int32")
    return _saturate(R.round(total), zero_point, dtype="float64")


def _largest_rounded(bounds: Sequence[int], multipliers: Sequence[FixedPointMultiplier]) -> int:
    """A bound on ``|acc * M * 2**-n|`` over channels, for accumulators bounded by ``bounds`` (per channel)."""
    return max((bound * m.multiplier >> m.shift) + 1 for bound, m in zip(bounds, multipliers, strict=True))


def _requantize(
    acc: relax.Expr,
    multipliers: Sequence[FixedPointMultiplier],
    rank: int,
    axis: int,
    zero_point: int = 0,
    bounds: Sequence[int] | None = None,
) -> relax.Expr:
    """int32/int64 accumulator -> int8 (``edgeq.numerics.requantize``, the output zero point, saturation), per
    channel on ``axis``; in float64 where ``bounds``, the largest ``|acc|`` each multiplier scales (one per channel,
    or one), prove that exact for every channel, else in int64."""
    shape = _channel_shape(rank, axis, len(multipliers)) if len(multipliers) > 1 else [1] * rank
    if bounds is not None and all(exact_in_float64(bound * m.multiplier) for bound, m in zip(bounds, multipliers, strict=True)):
        return _rounded_in_float64([(acc, multipliers)], shape, zero_point, _largest_rounded(bounds, multipliers))
    # the multipliers fit int32: kernel selection keeps them so, for a 32 x 32 -> 64-bit multiply (vpmuldq, smull)
    product = R.multiply(R.astype(acc, "int64"), _i64([m.multiplier for m in multipliers], shape))
    return _saturate(_round_shift(product, [m.shift for m in multipliers], shape), zero_point)


def _rescale(value: relax.Expr, source: _Activation, target: _Activation, rank: int, what: str) -> relax.Expr:
    """An int8 tensor brought to another quantization (the identity, skipped, when they are equal)."""
    if source == target:
        return value
    multiplier = quantize_multiplier(real_multiplier(source.scale, target.scale), what=what)
    centred = _centred(value, source.zero_point)
    return _requantize(centred, [multiplier], rank, 0, target.zero_point, [largest_input_magnitude(source.zero_point)])


# ---- the rules ------------------------------------------------------------------------------------------------------


def _dq(source: DFPattern | None = None) -> DFPattern:
    return is_op("relax.dequantize")(source or wildcard(), is_const(), is_const())


def _q(body: DFPattern) -> DFPattern:
    return is_op("relax.quantize")(body, is_const(), is_const())


LOWERING: OpTable[Callable[..., "_Rule"]] = OpTable("lowering rule in compile/lower_integer.py")
"""The factory of the rule that lowers each op's QDQ unit (``lower_to_integer`` runs them in its order)."""


class _Rule:
    """One QDQ unit: a pattern rooted at its quantize (or op) call, and how to write it in integers."""

    def __init__(self, name: str, pattern: DFPattern, rewrite: Callable[[relax.Call, dict], relax.Expr | None]):
        self.name = name
        self.pattern = pattern
        self.rewrite = rewrite

    def __call__(self, func: relax.Function) -> relax.Function:
        def rewriter(matched: relax.Call, matches: dict) -> relax.Expr:
            integer = self.rewrite(matched, matches)
            return matched if integer is None else integer

        return rewrite_call(self.pattern, rewriter, func)


def _input(dequantize: relax.Call) -> _Activation | None:
    """The quantization of a dequantized int8 activation (None for anything else)."""
    quant = _quant(dequantize, dequantize.args[0])
    return quant.activation if quant is not None and str(dequantize.args[0].ty.dtype) == "int8" else None


def _output(quantize: relax.Call) -> _Activation | None:
    """The quantization an int8 quantize call writes (None for anything else)."""
    quant = _quant(quantize, None)
    return quant.activation if quant is not None else None


def _symmetric_constant(dequantize: relax.Call, dtype: type[np.integer]) -> tuple[np.ndarray, _Quant] | None:
    """The values and quantization of a dequantized constant of ``dtype`` with zero points 0, else None."""
    values = _constant(dequantize.args[0])
    quant = _quant(dequantize, dequantize.args[0])
    if values is None or quant is None or values.dtype != dtype or quant.zero_points.any():
        return None
    return values, quant


def _weights(dequantize: relax.Call, channels_axis: int, channels: int) -> tuple[np.ndarray, list[float]] | None:
    """int8 weights and their per-channel scales (a per-tensor scale is repeated), or None if they do not fit."""
    constant = _symmetric_constant(dequantize, np.int8)
    if constant is None:
        return None
    values, quant = constant
    if quant.scales.size == 1:
        return values, [float(quant.scales[0])] * channels
    if quant.axis != channels_axis or quant.scales.size != channels:
        return None
    return values, [float(s) for s in quant.scales]


def _bias(dequantize: relax.Call | None, input_scale: float, weight_scales: list[float]) -> np.ndarray | None:
    """The int32 bias, if it sits at ``s_in * s_w`` (zeros when there is none, or when it is all zeros at any
    scale, as a bias shared by several layers can be); None if it does not fit."""
    if dequantize is None:
        return np.zeros(len(weight_scales), dtype=np.int32)
    constant = _symmetric_constant(dequantize, np.int32)
    if constant is None:
        return None
    values = constant[0].reshape(-1)
    if not bias_joins_accumulator(values, constant[1].scales, input_scale, weight_scales):
        return None
    return np.broadcast_to(values, (len(weight_scales),)).copy()


@dataclass(frozen=True)
class Conv2dSettings:
    """Stride, padding (top, left, bottom, right), dilation and groups of an NCHW / OIHW convolution."""

    strides: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int


def integer_accumulator(
    source: relax.Expr, weights: np.ndarray, bias: np.ndarray, conv: Conv2dSettings | None = None, zero_point: int = 0
) -> relax.Expr:
    """int8 x int8 -> int32 accumulation plus the int32 bias (docs/numerics.md section 5).

    ``weights`` are OIHW for a convolution (``conv`` given), else ``[in_features, out_features]`` for a matmul
    over the last axis of ``source``. An input ``zero_point`` (section 9) folds into the bias, and a convolution
    then pads with the zero point (the real 0) instead of 0.

    Raises:
        QuantizationError: the int32 accumulator could overflow (the bound of ``check_accumulator_bound``).
    """
    products_per_output = weights[0].size if conv is not None else weights.shape[0]
    if zero_point:
        bias = bias_with_input_zero_point(bias, weights, 0 if conv is not None else 1, zero_point, what="accumulator")
    check_accumulator_bound(products_per_output, bias, what="accumulator")
    if conv is not None:
        source, padding = _padded(source, conv.padding, zero_point)
        acc = R.nn.conv2d(
            source, relax.const(weights, "int8"), conv.strides, padding, conv.dilation, conv.groups,
            "NCHW", "OIHW", "NCHW", "int32",
        )
        shape = [1, -1, 1, 1]
    else:
        acc = R.matmul(source, relax.const(np.ascontiguousarray(weights), "int8"), out_dtype="int32")
        shape = [-1]
    return _wrapping_add(acc, relax.const(bias.astype(np.int32).reshape(shape), "int32"))


def _wrapping_add(left: relax.Expr, right: relax.Expr) -> relax.Expr:
    """``left + right`` on int32 that cannot overflow (the accumulator bound), added as uint32: LLVM then keeps the
    sum a sign-extended 32-bit value where it is widened (a signed add, marked as never overflowing, becomes an
    add of two 64-bit values), so the requantization multiplies 32 x 32 -> 64 bits."""
    wrapped = R.add(R.astype(left, "uint32"), R.astype(right, "uint32"))
    return R.astype(wrapped, "int32")


def _padded(source: relax.Expr, padding: Sequence[int], zero_point: int) -> tuple[relax.Expr, Sequence[int]]:
    """An NCHW int8 input padded with its zero point, and the padding left to the op (zeros: none left); the
    input itself when the zero point is 0 or there is no padding."""
    if not zero_point or not any(int(p) for p in padding):
        return source, padding
    top, left, bottom, right = (int(p) for p in padding)
    return R.nn.pad(source, [0, 0, 0, 0, top, bottom, left, right], "constant", float(zero_point)), [0, 0, 0, 0]


class _WeightedUnit:
    """A conv2d or linear QDQ unit: the float chain TVM imports, requantized to int8."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.source, self.weights, self.bias = _dq(), _dq(is_const()), _dq(is_const())
        if name == "conv2d":
            self.op = is_op("relax.nn.conv2d")(self.source, self.weights)
            chain = is_op("relax.add")(self.op, is_op("relax.reshape")(self.bias, wildcard())) | self.op
        else:
            self.transposed = is_op("relax.permute_dims")(self.weights)
            self.op = is_op("relax.matmul")(self.source, self.transposed | self.weights)
            chain = is_op("relax.add")(self.op, self.bias) | self.op
        self.pattern = _q(chain)

    def rewrite(self, matched: relax.Call, m: dict) -> relax.Expr | None:
        source, output = _input(m[self.source]), _output(matched)
        if source is None or output is None:
            return None
        call = m[self.op]
        conv = None
        if self.name == "conv2d":
            attrs = call.attrs
            if attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW":
                return None
            conv = Conv2dSettings(tuple(attrs.strides), tuple(attrs.padding), tuple(attrs.dilation), int(attrs.groups))
            rank, axis, transposed = 4, 1, False
        else:
            rank = len(call.ty.shape)
            axis = rank - 1
            transposed = self.transposed in m
            if transposed and [int(a) for a in m[self.transposed].attrs.axes] != [1, 0]:
                return None
        channels = int(call.ty.shape[axis])
        fitted = _weights(m[self.weights], 0 if conv is not None or transposed else 1, channels)
        if fitted is None:
            return None
        values, weight_scales = fitted
        bias = _bias(m.get(self.bias), source.scale, weight_scales)
        if bias is None:
            return None
        if conv is None and transposed:
            values = values.T
        channel_axis = 0 if conv is not None else 1
        acc = integer_accumulator(m[self.source].args[0], values, bias, conv, source.zero_point)
        bounds = accumulator_bounds(values, bias, channel_axis, source.zero_point)
        multipliers = conv_multipliers(source.scale, weight_scales, output.scale, what=self.name, bounds=bounds)
        return _requantize(acc, multipliers, rank, axis, output.zero_point, bounds)


@LOWERING.register(Op.CONV2D, Op.LINEAR)
def _weighted_rule(name: str) -> _Rule:
    unit = _WeightedUnit(name)
    return _Rule(name, unit.pattern, unit.rewrite)


@LOWERING.register(Op.ADD)
def _add_rule() -> _Rule:
    left, right = _dq(), _dq()
    quantize = _q(is_op("relax.add")(left, right))

    def rewrite(matched: relax.Call, m: dict) -> relax.Expr | None:
        inputs, output = (_input(m[left]), _input(m[right])), _output(matched)
        if None in inputs or output is None:
            return None
        multipliers, shift = quantize_multipliers([real_multiplier(i.scale, output.scale) for i in inputs], what="add")
        # Σ |q_i - z_i| * M_i < 2 * 2**8 * 2**31: always exact in float64
        terms = [
            (_centred(m[d].args[0], i.zero_point), [FixedPointMultiplier(f, shift)])
            for d, i, f in zip((left, right), inputs, multipliers)
        ]
        largest = sum(_largest_rounded([ACTIVATION_QMAX - ACTIVATION_QMIN], factors) for _, factors in terms)
        return _rounded_in_float64(terms, [1] * len(matched.ty.shape), output.zero_point, largest)

    return _Rule("add", quantize, rewrite)


def _same_quantization(matched: relax.Call, dequantize: relax.Call) -> bool:
    source = _input(dequantize)
    return source is not None and source == _output(matched)


@LOWERING.register(Op.RELU)
def _clamp_rule() -> _Rule:
    source = _dq()
    relu = is_op("relax.nn.relu")(source)
    clip = is_op("relax.clip")(source, wildcard(), wildcard())
    quantize = _q(relu | clip)

    def rewrite(matched: relax.Call, m: dict) -> relax.Expr | None:
        if not _same_quantization(matched, m[source]):
            return None
        value, output = m[source].args[0], _output(matched)
        if relu in m:
            return R.maximum(value, relax.const(output.zero_point, "int8"))
        bounds = [_prim_float(m[clip].args[i]) for i in (1, 2)]
        if None in bounds:
            return None
        low, high = (int(np.round(np.float32(b) / np.float32(output.scale))) + output.zero_point for b in bounds)
        return _saturate(value, 0, max(low, ACTIVATION_QMIN), min(high, ACTIVATION_QMAX))

    return _Rule("clamp", quantize, rewrite)


def _prim_float(expr: relax.Expr) -> float | None:
    constant = _constant(expr)
    if constant is not None:
        return float(constant.reshape(()))
    value = getattr(expr, "value", None)
    if isinstance(value, (int, float)):  # an IntImm / FloatImm argument
        return float(value)
    return float(value.value) if value is not None and hasattr(value, "value") else None


@LOWERING.register(Op.RESHAPE, Op.TRANSPOSE, Op.MAX_POOL2D, Op.SLICE, Op.UPSAMPLE_NEAREST2D)
def _data_movement_rule() -> _Rule:
    """Ops that only move values (reshape, transpose, max pool, nearest resize, slices): same op on int8."""
    source = _dq()
    moves = (
        is_op("relax.reshape")(source, wildcard())
        | is_op("relax.permute_dims")(source)
        | is_op("relax.nn.max_pool2d")(source)
        | is_op("relax.strided_slice")(source, wildcard(), wildcard(), wildcard(), wildcard())
        | is_op("relax.squeeze")(source)
        | is_op("relax.expand_dims")(source)
        | is_op("relax.image.resize2d")(source, wildcard())
    )
    quantize = _q(moves)

    def rewrite(matched: relax.Call, m: dict) -> relax.Expr | None:
        if not _same_quantization(matched, m[source]):
            return None
        op = m[moves]
        if op.op.name == "relax.image.resize2d":
            return _repeat(m[source].args[0], op)
        return relax.Call(op.op, [m[source].args[0], *op.args[1:]], op.attrs)

    return _Rule("data movement", quantize, rewrite)


def _repeat(value: relax.Expr, resize: relax.Call) -> relax.Expr | None:
    """Nearest upsampling by integer factors (asymmetric coordinates, floor) as repeats along H and W."""
    attrs = resize.attrs
    if attrs.method != "nearest_neighbor" or attrs.coordinate_transformation_mode != "asymmetric" or attrs.rounding_method != "floor":
        return None
    source = [int(d) for d in value.ty.shape]
    target = [int(d) for d in resize.ty.shape]
    if any(t % s for t, s in zip(target[2:], source[2:])):
        return None
    return R.repeat(R.repeat(value, target[2] // source[2], axis=2), target[3] // source[3], axis=3)


@LOWERING.register(Op.UPSAMPLE_BILINEAR2D)
def _bilinear_rule() -> _Rule:
    """Bilinear resize (TVM's import of ``Resize`` mode ``linear``): the four-tap sum with the fixed-point weights of
    ``numerics.bilinear_taps`` in int32 (``|acc| <= 2**29``), then requantization. Symmetric activations only; a
    file's zero points leave it to TVM's float computation."""
    source = _dq()
    resize = is_op("relax.image.resize2d")(source, wildcard())
    quantize = _q(resize)

    def rewrite(matched: relax.Call, m: dict) -> relax.Expr | None:
        source_quant, output, attrs = _input(m[source]), _output(matched), m[resize].attrs
        if source_quant is None or output is None or source_quant.zero_point or output.zero_point:
            return None
        if attrs.method != "linear" or attrs.layout != "NCHW":
            return None
        value = m[source].args[0]
        in_size, out_size = ([int(d) for d in shape][2:] for shape in (value.ty.shape, matched.ty.shape))
        align_corners = resize_align_corners(str(attrs.coordinate_transformation_mode), out_size)
        if align_corners is None:
            return None
        rows, columns = (bilinear_taps(n, o, align_corners) for n, o in zip(in_size, out_size))
        acc = _taps_sum(_taps_sum(R.astype(value, "int32"), rows, 2), columns, 3)
        multiplier = bilinear_multiplier(source_quant.scale, output.scale, what="bilinear resize")
        return _requantize(acc, [multiplier], 4, 0)

    return _Rule("bilinear resize", quantize, rewrite)


def _taps_sum(value: relax.Expr, taps: BilinearTaps, axis: int) -> relax.Expr:
    """``weight_low * value[low] + weight_high * value[high]`` along ``axis`` of an int32 NCHW tensor (the indices are
    in range: ``clip`` is a no-op)."""
    shape = _channel_shape(4, axis, len(taps.low))
    terms = [
        R.multiply(
            R.take(value, relax.const(index, "int64"), axis=axis, mode="clip"),
            relax.const(weight.astype(np.int32).reshape(shape), "int32"),
        )
        for index, weight in ((taps.low, taps.weight_low), (taps.high, taps.weight_high))
    ]
    return R.add(*terms)


@LOWERING.register(Op.SPLIT)
def _split_rule() -> _Rule:
    source = _dq()
    split = is_op("relax.split")(source)
    item = is_tuple_get_item(split)
    quantize = _q(item)

    def rewrite(matched: relax.Call, m: dict) -> relax.Expr | None:
        if not _same_quantization(matched, m[source]):
            return None
        parts = relax.Call(m[split].op, [m[source].args[0]], m[split].attrs)
        return relax.TupleGetItem(parts, m[item].index)

    return _Rule("split", quantize, rewrite)


@LOWERING.register(Op.AVG_POOL2D, Op.GLOBAL_AVG_POOL2D)
def _pool_rule() -> _Rule:
    """Average pools: the integer window sum, then requantization folding 1/N."""
    source = _dq()
    average = is_op("relax.nn.avg_pool2d")(source)
    mean = is_op("relax.mean")(source)
    quantize = _q(average | mean)

    def rewrite(matched: relax.Call, m: dict) -> relax.Expr | None:
        source_quant, output = _input(m[source]), _output(matched)
        value = m[source].args[0]
        shape = [int(d) for d in value.ty.shape]
        if source_quant is None or output is None or len(shape) != 4:
            return None
        if average in m:
            attrs = m[average].attrs
            if not attrs.count_include_pad or attrs.ceil_mode or any(int(d) != 1 for d in attrs.dilation):
                return None
            kernel = [int(k) for k in attrs.pool_size]
            ones = relax.const(np.ones((shape[1], 1, *kernel), dtype=np.int8), "int8")
            value, padding = _padded(value, attrs.padding, source_quant.zero_point)
            total = R.nn.conv2d(value, ones, attrs.strides, padding, (1, 1), shape[1], "NCHW", "OIHW", "NCHW", "int32")
            count = kernel[0] * kernel[1]
        else:
            axes = sorted(int(a) % 4 for a in m[mean].attrs.axis)
            if axes != [2, 3]:
                return None
            total = R.sum(R.astype(value, "int32"), axis=[2, 3], keepdims=bool(m[mean].attrs.keepdims))
            count = shape[2] * shape[3]
        if source_quant.zero_point:  # Σ (q - z) over the window = Σ q - N * z
            total = R.subtract(total, relax.const(count * source_quant.zero_point, "int32"))
        multiplier = quantize_multiplier(real_multiplier(source_quant.scale, output.scale, count=count), what="pool")
        bound = count * largest_input_magnitude(source_quant.zero_point)
        return _requantize(total, [multiplier], len(matched.ty.shape), 0, output.zero_point, [bound])

    return _Rule("pool", quantize, rewrite)


@LOWERING.register(Op.CONCAT)
def _concat_rule(bindings: dict[relax.Var, relax.Expr]) -> _Rule:
    concat = is_op("relax.concat")(wildcard())
    quantize = _q(concat)

    def rewrite(matched: relax.Call, m: dict) -> relax.Expr | None:
        output = _output(matched)
        fields = m[concat].args[0]
        fields = bindings.get(fields, fields)
        if output is None or not isinstance(fields, relax.Tuple):
            return None
        parts = []
        rank = len(matched.ty.shape)
        for index, field in enumerate(fields.fields):
            dequantize = bindings.get(field, field)
            if not (isinstance(dequantize, relax.Call) and dequantize.op.name == "relax.dequantize"):
                return None
            source = _input(dequantize)
            if source is None:
                return None
            parts.append(_rescale(dequantize.args[0], source, output, rank, f"concat input {index}"))
        return R.concat(parts, axis=int(m[concat].attrs.axis))

    return _Rule("concat", quantize, rewrite)


Accumulate = Callable[[Sequence[relax.Expr], Sequence[_Activation]], "tuple[relax.Expr, int] | None"]
"""How a product of two activations sums: (the exact accumulator of ``Σ (a - z_a)(b - z_b)``, the products per
output), or None when it does not fit."""


def _product_rule(name: str, relax_op: str, accumulate: Accumulate) -> _Rule:
    """A product of two dequantized activations, ``relax_op(a, b)``, requantized with the multiplier of
    ``numerics.product_multiplier`` (mul and matmul share it: ``m = s_a * s_b / s_out``)."""
    left, right = _dq(), _dq()
    quantize = _q(is_op(relax_op)(left, right))

    def rewrite(matched: relax.Call, m: dict) -> relax.Expr | None:
        inputs, output = (_input(m[left]), _input(m[right])), _output(matched)
        if None in inputs or output is None:
            return None
        accumulated = accumulate([m[d].args[0] for d in (left, right)], inputs)
        if accumulated is None:
            return None
        acc, reduction_size = accumulated
        zero_points = [i.zero_point for i in inputs]
        multiplier = product_multiplier(
            [i.scale for i in inputs], output.scale, what=name, zero_points=zero_points, reduction_size=reduction_size
        )
        bound = product_accumulator_bound(reduction_size, zero_points)
        return _requantize(acc, [multiplier], len(matched.ty.shape), 0, output.zero_point, [bound])

    return _Rule(name, quantize, rewrite)


@LOWERING.register(Op.MUL)
def _mul_rule() -> _Rule:
    """Elementwise product (broadcasting): int32 product of the int8 values less their zero points (at most
    ``2**16``), then requantization."""

    def product(values: Sequence[relax.Expr], inputs: Sequence[_Activation]) -> tuple[relax.Expr, int]:
        return R.multiply(*(_centred(v, i.zero_point) for v, i in zip(values, inputs))), 1

    return _product_rule("mul", "relax.multiply", product)


@LOWERING.register(Op.MATMUL)
def _matmul_rule() -> _Rule:
    """Matrix product of two activations (the last two axes; leading axes broadcast, as ONNX MatMul and torch): the
    int8 x int8 -> int32 matmul, zero-point corrections, then requantization (docs/numerics.md, "Matrix product")."""
    return _product_rule("matmul", "relax.matmul", _matmul_accumulator)


def _matmul_accumulator(values: Sequence[relax.Expr], inputs: Sequence[_Activation]) -> tuple[relax.Expr, int] | None:
    """``Σ_k (a - z_a)(b - z_b)`` exactly: the int32 matmul of the raw int8 values (``|Σ_k a b| <= K * 2**14``), and
    with zero points the expansion's corrections in int64, ``- z_b Σ_k a - z_a Σ_k b + K z_a z_b`` (docs/numerics.md
    section 9). None for operands of fewer than two axes or unknown shapes.

    Raises:
        QuantizationError: the accumulator could overflow int32 (``numerics.check_product_accumulator_bound``).
    """
    left, right = values
    shapes = [value.ty.shape for value in values]
    if any(shape is None or len(shape) < 2 for shape in shapes) or not isinstance(shapes[0][-1], tvm.tirx.IntImm):
        return None
    reduction_size = int(shapes[0][-1])
    zero_left, zero_right = (i.zero_point for i in inputs)
    check_product_accumulator_bound(reduction_size, (zero_left, zero_right), what="matmul")
    acc = R.matmul(left, right, out_dtype="int32")
    if not (zero_left or zero_right):
        return acc, reduction_size
    acc = R.astype(acc, "int64")
    if zero_right:  # Σ_k a[..., i, k], kept as a column
        sums = R.sum(R.astype(left, "int64"), axis=[len(shapes[0]) - 1], keepdims=True)
        acc = R.subtract(acc, R.multiply(sums, relax.const(zero_right, "int64")))
    if zero_left:  # Σ_k b[..., k, j], kept as a row
        sums = R.sum(R.astype(right, "int64"), axis=[len(shapes[1]) - 2], keepdims=True)
        acc = R.subtract(acc, R.multiply(sums, relax.const(zero_left, "int64")))
    if zero_left and zero_right:
        acc = R.add(acc, relax.const(reduction_size * zero_left * zero_right, "int64"))
    return acc, reduction_size


FAST_GELU_CONSTANTS = (0.5, 1.0, math.sqrt(2 / math.pi), 0.044715 * math.sqrt(2 / math.pi))
"""The constants of ``0.5 x (1 + tanh(c1 x + c2 x^3))``, TVM's import of ONNX Runtime's ``FastGelu`` (the GELU
tanh form), in the order :func:`_fast_gelu` lists them."""


def _fast_gelu(source: DFPattern) -> tuple[DFPattern, tuple[DFPattern, ...]]:
    """TVM's import of ``FastGelu(x)`` without bias, ``multiply(0.5 * x, 1 + tanh(c1 * x + c2 * (x * x * x)))``, and
    its constant patterns (half, one, c1, c2)."""
    half, one, c1, c2 = is_const(), is_const(), is_const(), is_const()
    multiply, add = is_op("relax.multiply"), is_op("relax.add")
    cube = multiply(multiply(source, source), source)
    inner = add(multiply(c1, source), multiply(c2, cube))
    return multiply(multiply(half, source), add(one, is_op("relax.tanh")(inner))), (half, one, c1, c2)


def _scalar(expr: relax.Expr) -> float | None:
    value = _constant(expr)
    return float(value.reshape(())) if value is not None and value.size == 1 else None


@LOWERING.register(*LOOKUP_TABLE_OPS)
def _lookup_table_rule() -> _Rule:
    """Table activations (as TVM imports each ONNX form): one gather from ``numerics.lookup_table``."""
    source = _dq()
    alpha, beta = is_const(), is_const()
    hard = is_op("relax.clip")(is_op("relax.add")(is_op("relax.multiply")(alpha, source), beta), wildcard(), wildcard())
    sigmoid, tanh, leaky, gelu, gelu_tanh = (
        is_op(name)(source)
        for name in ("relax.sigmoid", "relax.tanh", "relax.nn.leakyrelu", "relax.nn.gelu", "relax.nn.gelu_tanh")
    )
    silu, hardswish = is_op("relax.multiply")(source, sigmoid), is_op("relax.multiply")(source, hard)
    fast_gelu, fast_constants = _fast_gelu(source)
    forms = {
        silu: Op.SILU, hardswish: Op.HARDSWISH, sigmoid: Op.SIGMOID, tanh: Op.TANH, leaky: Op.LEAKYRELU,
        hard: Op.HARDSIGMOID, gelu: Op.GELU, gelu_tanh: Op.GELU_TANH, fast_gelu: Op.GELU_TANH,
    }
    quantize = _q(silu | hardswish | sigmoid | tanh | leaky | hard | gelu | gelu_tanh | fast_gelu)

    def rewrite(matched: relax.Call, m: dict) -> relax.Expr | None:
        source_quant, output = _input(m[source]), _output(matched)
        function = next(f for form, f in forms.items() if form in m)
        if source_quant is None or output is None:
            return None
        if hard in m:
            slope, offset = (float(_constant(m[c]).reshape(())) for c in (alpha, beta))
            bounds = [_prim_float(m[hard].args[i]) for i in (1, 2)]
            if (slope, offset, *bounds) != (float(np.float32(1 / 6)), 0.5, 0.0, 1.0):
                return None
        if fast_gelu in m and [_scalar(m[c]) for c in fast_constants] != [float(np.float32(v)) for v in FAST_GELU_CONSTANTS]:
            return None
        slope = float(m[leaky].attrs.alpha) if leaky in m else 0.0
        zero_points = (source_quant.zero_point, output.zero_point)
        table = lookup_table(function, source_quant.scale, output.scale, slope, zero_points)
        index = R.add(R.astype(m[source].args[0], "int32"), relax.const(-ACTIVATION_QMIN, "int32"))
        return R.take(relax.const(table, "int8"), index, axis=0, mode="clip")  # indices are in [0, 255]: clip is a no-op

    return _Rule("lookup table", quantize, rewrite)


def _bindings(func: relax.Function) -> dict[relax.Var, relax.Expr]:
    return {binding.var: binding.value for block in func.body.blocks for binding in block.bindings}


def lower_to_integer(func: relax.Function) -> relax.Function:
    """Rewrite every QDQ unit of ``func`` that fits docs/numerics.md into integer Relax ops (see module doc).

    Raises:
        QuantizationError: a unit fits but its scales need a multiplier outside the numerics' range.
    """
    rules = [
        _weighted_rule("conv2d"),
        _weighted_rule("linear"),
        _add_rule(),
        _pool_rule(),
        _clamp_rule(),
        _data_movement_rule(),
        _bilinear_rule(),
        _split_rule(),
        _lookup_table_rule(),
        _mul_rule(),
        _matmul_rule(),
    ]
    for rule in rules:
        func = rule(func)
    func = _concat_rule(_bindings(func))(func)
    return func

