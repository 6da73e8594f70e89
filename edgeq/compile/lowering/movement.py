"""Lowering of the ops that keep their input's quantization: data movement (reshape, transpose, max pool, nearest
resize, slices), split, pad and clamps (ReLU, ReLU6, clip)."""

from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.relax import op as R
from tvm.relax.dpl import is_call_tir, is_const, is_op, is_tuple_get_item, wildcard

from edgeq.compile.integer_relax import Activation, lowering_rounding, saturate
from edgeq.compile.lowering import qdq
from edgeq.compile.lowering.rule import LOWERING, Rule, dq, q
from edgeq.numerics import ACTIVATION_QMAX, ACTIVATION_QMIN, quantized_level
from edgeq.ops import Op


@LOWERING.register(Op.RELU)
def _clamp_rule() -> Rule:
    """ReLU, and Clip at constant bounds: ``relax.clip``, or, as TVM imports ONNX's Clip of opset 11 and later,
    ``call_tir`` kernels ``maximum`` (the floor) then ``minimum`` (the ceiling), either alone when that bound is
    absent, each bound a constant or the ``where(isnan(bound), inf, bound)`` TVM wraps it in."""
    source = dq()
    relu = is_op("relax.nn.relu")(source)
    clip = is_op("relax.clip")(source, wildcard(), wildcard())
    low, high = _ClipBound(), _ClipBound()
    floor = is_call_tir("maximum", [source, low.pattern])
    ceiling = is_call_tir("minimum", [floor | source, high.pattern])
    quantize = q(relu | clip | ceiling | floor)

    def rewrite(matched: relax.Call, m: dict) -> relax.Expr | None:
        if not qdq.same_quantization(matched, m[source]):
            return None
        value, output = m[source].args[0], qdq.output_activation(matched)
        if relu in m:
            return R.maximum(value, relax.const(output.zero_point, "int8"))
        if clip in m:
            bounds = [qdq.prim_float(m[clip].args[i]) for i in (1, 2)]
        else:
            sides = ((floor, low, -np.inf), (ceiling, high, np.inf))
            bounds = [bound.value(m, unbounded) if call in m else unbounded for call, bound, unbounded in sides]
        if None in bounds:
            return None
        levels = [_level(b, output) for b in bounds]
        return saturate(value, 0, max(levels[0], ACTIVATION_QMIN), min(levels[1], ACTIVATION_QMAX))

    return Rule("clamp", quantize, rewrite)


class _ClipBound:
    """A float bound of TVM's import of ONNX Clip: a constant, or ``where(isnan(c), ±inf, c)`` of one."""

    def __init__(self) -> None:
        self.tested, self.kept, self.plain = is_const(), is_const(), is_const()
        self.pattern = self.plain | is_op("relax.where")(is_op("relax.isnan")(self.tested), is_const(), self.kept)

    def value(self, m: dict, unbounded: float) -> float | None:
        """The matched bound (``unbounded`` for NaN, which ONNX reads as no bound; None if not one constant)."""
        if self.plain in m:
            value = qdq.scalar(m[self.plain])
        else:  # where(isnan(c), ±inf, c): c, unless the two constants differ
            value, tested = qdq.scalar(m[self.kept]), qdq.scalar(m[self.tested])
            if tested is None or not np.array_equal(tested, value, equal_nan=True):
                return None
        return unbounded if value is not None and np.isnan(value) else value


def _level(bound: float, output: Activation) -> int:
    """An activation level of a float bound at the output's quantization (beyond int8 for an infinite one)."""
    if np.isinf(bound):
        return ACTIVATION_QMIN - 1 if bound < 0 else ACTIVATION_QMAX + 1
    return quantized_level(bound, output.scale, lowering_rounding()) + output.zero_point


@LOWERING.register(Op.RESHAPE, Op.TRANSPOSE, Op.MAX_POOL2D, Op.SLICE, Op.UPSAMPLE_NEAREST2D)
def _data_movement_rule() -> Rule:
    """Ops that only move values (reshape, transpose, max pool, nearest resize, slices): same op on int8."""
    source = dq()
    moves = (
        is_op("relax.reshape")(source, wildcard())
        | is_op("relax.permute_dims")(source)
        | is_op("relax.nn.max_pool2d")(source)
        | is_op("relax.strided_slice")(source, wildcard(), wildcard(), wildcard(), wildcard())
        | is_op("relax.squeeze")(source)
        | is_op("relax.expand_dims")(source)
        | is_op("relax.image.resize2d")(source, wildcard())
    )
    quantize = q(moves)

    def rewrite(matched: relax.Call, m: dict) -> relax.Expr | None:
        if not qdq.same_quantization(matched, m[source]):
            return None
        op = m[moves]
        if op.op.name == "relax.image.resize2d":
            return _repeat(m[source].args[0], op)
        return relax.Call(op.op, [m[source].args[0], *op.args[1:]], op.attrs)

    return Rule("data movement", quantize, rewrite)


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


@LOWERING.register(Op.PAD)
def _pad_rule() -> Rule:
    """A pad with the real value 0: the same pad of the integers with the zero point."""
    source = dq()
    pad = is_op("relax.nn.pad")(source)
    quantize = q(pad)

    def rewrite(matched: relax.Call, m: dict) -> relax.Expr | None:
        attrs = m[pad].attrs
        if not qdq.same_quantization(matched, m[source]) or attrs.pad_mode != "constant" or float(attrs.pad_value) != 0.0:
            return None
        zero_point = qdq.output_activation(matched).zero_point
        return R.nn.pad(m[source].args[0], [int(w) for w in attrs.pad_width], "constant", float(zero_point))

    return Rule("pad", quantize, rewrite)


@LOWERING.register(Op.SPLIT)
def _split_rule() -> Rule:
    source = dq()
    split = is_op("relax.split")(source)
    item = is_tuple_get_item(split)
    quantize = q(item)

    def rewrite(matched: relax.Call, m: dict) -> relax.Expr | None:
        if not qdq.same_quantization(matched, m[source]):
            return None
        parts = relax.Call(m[split].op, [m[source].args[0]], m[split].attrs)
        return relax.TupleGetItem(parts, m[item].index)

    return Rule("split", quantize, rewrite)
