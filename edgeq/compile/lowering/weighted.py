"""Lowering of the weighted ops (conv2d, linear): the int8 accumulation with the int32 bias, then the per-channel
requantization."""

from __future__ import annotations

from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard

from edgeq.compile.integer_relax import Conv2dSettings, integer_accumulator, lowering_rounding, requantize
from edgeq.compile.lowering import qdq
from edgeq.compile.lowering.rule import LOWERING, Rule, dq, q
from edgeq.numerics import accumulator_bounds, conv_multipliers
from edgeq.ops import Op


class _WeightedUnit:
    """A conv2d or linear QDQ unit: the float chain TVM imports, requantized to int8."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.source, self.weights, self.bias = dq(), dq(is_const()), dq(is_const())
        if name == "conv2d":
            self.op = is_op("relax.nn.conv2d")(self.source, self.weights)
            chain = is_op("relax.add")(self.op, is_op("relax.reshape")(self.bias, wildcard())) | self.op
        else:
            self.transposed = is_op("relax.permute_dims")(self.weights)
            self.op = is_op("relax.matmul")(self.source, self.transposed | self.weights)
            chain = is_op("relax.add")(self.op, self.bias) | self.op
        self.pattern = q(chain)

    def rewrite(self, matched: relax.Call, m: dict) -> relax.Expr | None:
        source, output = qdq.input_activation(m[self.source]), qdq.output_activation(matched)
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
        fitted = qdq.weights(m[self.weights], 0 if conv is not None or transposed else 1, channels)
        if fitted is None:
            return None
        values, weight_scales = fitted
        bias = qdq.bias(m.get(self.bias), source.scale, weight_scales)
        if bias is None:
            return None
        if conv is None and transposed:
            values = values.T
        channel_axis = 0 if conv is not None else 1
        acc = integer_accumulator(m[self.source].args[0], values, bias, conv, source.zero_point, what=self.name, allow_int64=True)
        bounds = accumulator_bounds(values, bias, channel_axis, source.zero_point)
        multipliers = conv_multipliers(
            source.scale, weight_scales, output.scale, what=self.name, bounds=bounds, rounding=lowering_rounding()
        )
        return requantize(acc, multipliers, rank, axis, output.zero_point, bounds)


def _weighted_rule(name: str) -> Rule:
    unit = _WeightedUnit(name)
    return Rule(name, unit.pattern, unit.rewrite)


@LOWERING.register(Op.CONV2D)
def _conv2d_rule() -> Rule:
    return _weighted_rule("conv2d")


@LOWERING.register(Op.LINEAR)
def _linear_rule() -> Rule:
    return _weighted_rule("linear")
