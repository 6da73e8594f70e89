"""Lowering of the bilinear resize: the four-tap integer sum, then requantization."""

from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.relax import op as R
from tvm.relax.dpl import is_op, wildcard

from edgeq.compile.integer_relax import channel_shape, lowering_rounding, requantize
from edgeq.compile.lowering import qdq
from edgeq.compile.lowering.rule import LOWERING, Rule, dq, q
from edgeq.numerics import BilinearTaps, bilinear_multiplier, bilinear_taps, resize_align_corners
from edgeq.ops import Op


@LOWERING.register(Op.UPSAMPLE_BILINEAR2D)
def _bilinear_rule() -> Rule:
    """Bilinear resize (TVM's import of ``Resize`` mode ``linear``): the four-tap sum with the fixed-point weights of
    ``numerics.bilinear_taps`` in int32 (``|acc| <= 2**29``), then requantization. Symmetric activations only; a
    file's zero points leave it to TVM's float computation."""
    source = dq()
    resize = is_op("relax.image.resize2d")(source, wildcard())
    quantize = q(resize)

    def rewrite(matched: relax.Call, m: dict) -> relax.Expr | None:
        source_quant, output, attrs = qdq.input_activation(m[source]), qdq.output_activation(matched), m[resize].attrs
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
        multiplier = bilinear_multiplier(source_quant.scale, output.scale, what="bilinear resize", rounding=lowering_rounding())
        return requantize(acc, [multiplier], 4, 0)

    return Rule("bilinear resize", quantize, rewrite)


def _taps_sum(value: relax.Expr, taps: BilinearTaps, axis: int) -> relax.Expr:
    """``weight_low * value[low] + weight_high * value[high]`` along ``axis`` of an int32 NCHW tensor (the indices are
    in range: ``clip`` is a no-op)."""
    shape = channel_shape(4, axis, len(taps.low))
    terms = [
        R.multiply(
            R.take(value, relax.const(index, "int64"), axis=axis, mode="clip"),
            relax.const(weight.astype(np.int32).reshape(shape), "int32"),
        )
        for index, weight in ((taps.low, taps.weight_low), (taps.high, taps.weight_high))
    ]
    return R.add(*terms)
