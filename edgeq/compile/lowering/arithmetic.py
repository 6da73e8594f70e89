"""Lowering of the ops that sum int8 values at new scales: add, the average pools and concat."""

from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.relax import op as R
from tvm.relax.dpl import is_op, wildcard

from edgeq.compile.integer_relax import centred, lowering_rounding, padded, requantize, requantize_sum, rescale
from edgeq.compile.lowering import qdq
from edgeq.compile.lowering.rule import LOWERING, Lowering, Rule, dq, function_bindings, q
from edgeq.numerics import (
    ACTIVATION_QMAX,
    ACTIVATION_QMIN,
    FixedPointMultiplier,
    add_multipliers,
    largest_input_magnitude,
    quantize_multiplier,
    real_multiplier,
)
from edgeq.ops import Op


@LOWERING.register(Op.ADD)
def _add_rule() -> Rule:
    left, right = dq(), dq()
    quantize = q(is_op("relax.add")(left, right))

    def rewrite(matched: relax.Call, m: dict) -> relax.Expr | None:
        inputs, output = (qdq.input_activation(m[left]), qdq.input_activation(m[right])), qdq.output_activation(matched)
        if None in inputs or output is None:
            return None
        factors = [real_multiplier(i.scale, output.scale) for i in inputs]
        multipliers, shift = add_multipliers(factors, what="add", rounding=lowering_rounding())
        terms = [
            (centred(m[d].args[0], i.zero_point), FixedPointMultiplier(f, shift), ACTIVATION_QMAX - ACTIVATION_QMIN)
            for d, i, f in zip((left, right), inputs, multipliers)
        ]
        return requantize_sum(terms, len(matched.ty.shape), output.zero_point)

    return Rule("add", quantize, rewrite)


@LOWERING.register(Op.AVG_POOL2D, Op.GLOBAL_AVG_POOL2D)
def _pool_rule() -> Rule:
    """Average pools: the integer window sum, then requantization folding 1/N."""
    source = dq()
    average = is_op("relax.nn.avg_pool2d")(source)
    mean = is_op("relax.mean")(source)
    quantize = q(average | mean)

    def rewrite(matched: relax.Call, m: dict) -> relax.Expr | None:
        source_quant, output = qdq.input_activation(m[source]), qdq.output_activation(matched)
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
            value, padding = padded(value, attrs.padding, source_quant.zero_point)
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
        factor = real_multiplier(source_quant.scale, output.scale, count=count)
        multiplier = quantize_multiplier(factor, what="pool", rounding=lowering_rounding())
        bound = count * largest_input_magnitude(source_quant.zero_point)
        return requantize(total, [multiplier], len(matched.ty.shape), 0, output.zero_point, [bound])

    return Rule("pool", quantize, rewrite)


@LOWERING.register(Op.CONCAT)
def _concat_rule() -> Lowering:
    """Concat: each input rescaled to the output's quantization. Its inputs are read through the bindings of the
    function, taken when the rule runs (after the rules before it rewrote their units)."""
    return lambda func: _concat_unit(function_bindings(func))(func)


def _concat_unit(bindings: dict[relax.Var, relax.Expr]) -> Rule:
    concat = is_op("relax.concat")(wildcard())
    quantize = q(concat)

    def rewrite(matched: relax.Call, m: dict) -> relax.Expr | None:
        output = qdq.output_activation(matched)
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
            source = qdq.input_activation(dequantize)
            if source is None:
                return None
            parts.append(rescale(dequantize.args[0], source, output, rank, f"concat input {index}"))
        return R.concat(parts, axis=int(m[concat].attrs.axis))

    return Rule("concat", quantize, rewrite)
