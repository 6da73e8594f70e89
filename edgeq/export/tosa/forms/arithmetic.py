"""TOSA forms of the ops that rescale int8 values without products: add (RESCALE each input to int32, ADD,
RESCALE to int8), concat (RESCALE each input, CONCAT), the clamps (CLAMP) and the lookup-table activations
(TABLE of edgeq's 256 int8 entries)."""

from __future__ import annotations

import math

import numpy as np
import tosa_serializer as ts

from edgeq.export.tosa.builder import TosaBuilder, TosaValue, attribute, image_layout
from edgeq.export.tosa.forms.unit import TOSA_FORMS, OpUnit
from edgeq.numerics import ACTIVATION_QMAX, ACTIVATION_QMIN, clamp_levels
from edgeq.ops import LOOKUP_TABLE_OPS, Op

INT8_SHIFT = 8
"""RESCALE of an int8 ``q`` by ``2**8 * M`` and shift 8 is exactly ``q * M`` (``(2**8 * q * M + 2**7) >> 8``): the
smallest shift TOSA 1.0 allows for int8 values (``-2**(n-1) <= q < 2**(n-1)``)."""

SUM_SHIFT_FLOOR = 32
"""A sum of two int32 terms is rescaled by ``2**k`` and shift ``n + k``, ``n + k >= 32`` (TOSA's range for the
values), which rounds ``sum / 2**n`` exactly as shift ``n`` would."""

IDENTITY_RESCALE = (2**30, 30)
"""The multiplier and shift of a rescale to the same scale: the identity, exactly."""


@TOSA_FORMS.register(Op.ADD)
def _add(builder: TosaBuilder, unit: OpUnit) -> list[TosaValue]:
    """Each input RESCALEd to int32 by ``2**8 * M_i`` and shift 8 (``q_i * M_i`` exactly), ADD in int32
    (``|sum| <= 128 * (M_a + M_b) < 2**31``: the half_up rule's 23-bit multipliers, :func:`edgeq.numerics.
    add_multipliers`), RESCALE by ``2**k`` and shift ``n + k``: ``sum / 2**n`` rounded once, half up."""
    constants = unit.requantization()
    multipliers, (shift,) = constants.multiplier, constants.shift
    shape, name = unit.output_shape(), unit.outputs[0]
    terms = []
    for index, (value, multiplier) in enumerate(zip(unit.inputs, multipliers)):
        value = builder.broadcastable(value, len(shape), f"{name}.{index}")
        terms.append(builder.rescale(value, [multiplier << INT8_SHIFT], [INT8_SHIFT], ts.DType.INT32, f"{name}.term{index}", what=unit.what))
    total = builder.operator(ts.Op.ADD, [t.name for t in terms], f"{name}.sum", shape, ts.DType.INT32, terms[0].perm, attribute("AddAttribute"))
    widen = max(0, SUM_SHIFT_FLOOR - shift)  # at most 30 (n >= 2), and n + k <= 62
    bound = -ACTIVATION_QMIN * sum(multipliers)
    return [builder.rescale(total, [1 << widen], [shift + widen], ts.DType.INT8, name, what=unit.what, value_range=(-bound, bound))]


@TOSA_FORMS.register(Op.CONCAT)
def _concat(builder: TosaBuilder, unit: OpUnit) -> list[TosaValue]:
    """Each input RESCALEd to the output's scale (none where it is the identity), then CONCAT."""
    constants = unit.requantization()
    shape, name = unit.output_shape(), unit.outputs[0]
    parts = []
    for index, (value, multiplier, shift) in enumerate(zip(unit.inputs, constants.multiplier, constants.shift)):
        value = builder.in_layout(value, image_layout(len(shape)))
        if (multiplier, shift) != IDENTITY_RESCALE:
            value = builder.rescale(value, [multiplier], [shift], ts.DType.INT8, f"{name}.input{index}", what=unit.what)
        parts.append(value)
    axis = parts[0].physical_axis(int(unit.attributes["axis"]))
    made = attribute("ConcatAttribute", axis)
    return [builder.operator(ts.Op.CONCAT, [p.name for p in parts], name, shape, ts.DType.INT8, parts[0].perm, made)]


@TOSA_FORMS.register(Op.RELU)
def _clamp(builder: TosaBuilder, unit: OpUnit) -> list[TosaValue]:
    """CLAMP at the int8 levels of the bounds (ReLU: 0; Clip: each bound at the scale, as the integer model's
    levels, :func:`edgeq.numerics.clamp_levels`)."""
    if unit.node.op_type == "Relu":
        low, high = 0, ACTIVATION_QMAX
    else:
        bounds = [_bound(unit, index, default) for index, default in ((1, -math.inf), (2, math.inf))]
        low, high = clamp_levels((bounds[0], bounds[1]), unit.record.quant.output_scale)
    return [builder.clamp(unit.inputs[0], low, high, unit.outputs[0])]


def _bound(unit: OpUnit, index: int, default: float) -> float:
    tensor = unit.node.input[index] if len(unit.node.input) > index else ""
    if not tensor:
        return default
    if tensor not in unit.graph.constants:
        raise unit.refuse(f"its bound '{tensor}' is not a constant")
    value = float(unit.graph.constants[tensor].reshape(()))
    return default if np.isnan(value) else value


@TOSA_FORMS.register(*LOOKUP_TABLE_OPS)
def _table(builder: TosaBuilder, unit: OpUnit) -> list[TosaValue]:
    """TABLE of the op's 256 int8 entries (entry ``q + 128`` for input ``q``), the integer model's table."""
    table = np.asarray(unit.requantization().table, dtype=np.int8)
    source, name = unit.inputs[0], unit.outputs[0]
    inputs = [source.name, builder.const(f"{name}.table", table, ts.DType.INT8)]
    return [builder.operator(ts.Op.TABLE, inputs, name, source.shape, ts.DType.INT8, source.perm, attribute("TableAttribute"))]
