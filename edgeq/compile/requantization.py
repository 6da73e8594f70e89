"""The integer constants each op rescales its result with (docs/numerics.md), one function per op kind,
registered against the op: the compiled graph, the NPU program and the report read them from here."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from edgeq.check.records import OpRecord, QuantFacts
from edgeq.numerics import (
    add_multipliers,
    bilinear_multiplier,
    conv_multipliers,
    lookup_table,
    product_multiplier,
    quantize_multiplier,
    real_multiplier,
)
from edgeq.op_attrs import MatMulAttrs
from edgeq.ops import LOOKUP_TABLE_OPS, OP_NAMES, Op, OpTable
from edgeq.targets import Rounding


@dataclass(frozen=True)
class Requantization:
    """The integer constants an op rescales its result with (docs/numerics.md).

    Attributes:
        multiplier: 31-bit fixed-point multipliers (empty for a lookup table).
        shift: right shifts, one per multiplier, or one shared by all of them.
        axis: the output's channel axis for per-channel constants (conv2d, linear), else None.
        per: what each multiplier is for: ``channel``, ``input`` (add, concat: one per input), ``tensor``, or
            ``table`` (a lookup-table activation: ``table`` holds the 256 int8 outputs for inputs -128..127; the
            int8 form of a uint8 op, docs/numerics.md section 9).
        table: the lookup table of a table activation, else None.
    """

    multiplier: list[int]
    shift: list[int]
    axis: int | None
    per: str
    table: list[int] | None = None


Constants = Callable[[OpRecord, QuantFacts, str, Rounding], Requantization]

REQUANTIZATION: OpTable[Constants] = OpTable("requantization in compile/requantization.py", lambda info: info.requantizes)
"""The integer constants of each op whose output scale differs from its input's."""


def requantization(record: OpRecord, rounding: Rounding = Rounding.HALF_TO_EVEN) -> Requantization | None:
    """The integer constants an op's requantization uses under the target's ``rounding`` (None when it keeps its
    input's scale, or runs in float)."""
    quant = record.quant
    if quant is None or quant.output_scale is None or record.float_only or record.op not in OP_NAMES:
        return None
    constants = REQUANTIZATION.get(Op(record.op))
    return constants(record, quant, f"'{record.name}'", rounding) if constants is not None else None


@REQUANTIZATION.register(Op.CONV2D, Op.LINEAR)
def _per_channel(record: OpRecord, quant: QuantFacts, what: str, rounding: Rounding) -> Requantization:
    bounds = quant.accumulator_bounds or None
    fixed = conv_multipliers(
        quant.input_scales[0], quant.weight_scales, quant.output_scale, what=what, bounds=bounds, rounding=rounding
    )
    axis = 1 if record.op == Op.CONV2D.value else len(record.output_shape or (0, 0)) - 1
    return Requantization([m.multiplier for m in fixed], [m.shift for m in fixed], axis, "channel")


@REQUANTIZATION.register(Op.ADD)
def _sum(record: OpRecord, quant: QuantFacts, what: str, rounding: Rounding) -> Requantization:
    multipliers, shift = add_multipliers([real_multiplier(s, quant.output_scale) for s in quant.input_scales], what=what, rounding=rounding)
    return Requantization(list(multipliers), [shift], None, "input")


@REQUANTIZATION.register(Op.MUL, Op.MATMUL)
def _product(record: OpRecord, quant: QuantFacts, what: str, rounding: Rounding) -> Requantization:
    fixed = product_multiplier(
        quant.input_scales,
        quant.output_scale,
        what=what,
        zero_points=quant.input_zero_points or (0, 0),
        reduction_size=record.attrs.reduction_size if isinstance(record.attrs, MatMulAttrs) else 1,
        rounding=rounding,
    )
    return Requantization([fixed.multiplier], [fixed.shift], None, "tensor")


@REQUANTIZATION.register(Op.CONCAT)
def _per_input(record: OpRecord, quant: QuantFacts, what: str, rounding: Rounding) -> Requantization:
    fixed = [quantize_multiplier(real_multiplier(s, quant.output_scale), what=what, rounding=rounding) for s in quant.input_scales]
    return Requantization([m.multiplier for m in fixed], [m.shift for m in fixed], None, "input")


@REQUANTIZATION.register(Op.AVG_POOL2D, Op.GLOBAL_AVG_POOL2D)
def _average(record: OpRecord, quant: QuantFacts, what: str, rounding: Rounding) -> Requantization:
    count = math.prod(record.attrs.kernel) if record.op == Op.AVG_POOL2D.value else math.prod(record.input_shapes[0][2:])
    fixed = quantize_multiplier(real_multiplier(quant.input_scales[0], quant.output_scale, count=count), what=what, rounding=rounding)
    return Requantization([fixed.multiplier], [fixed.shift], None, "tensor")


@REQUANTIZATION.register(Op.UPSAMPLE_BILINEAR2D)
def _bilinear(record: OpRecord, quant: QuantFacts, what: str, rounding: Rounding) -> Requantization:
    fixed = bilinear_multiplier(quant.input_scales[0], quant.output_scale, what=what, rounding=rounding)
    return Requantization([fixed.multiplier], [fixed.shift], None, "tensor")


@REQUANTIZATION.register(*LOOKUP_TABLE_OPS)
def _table(record: OpRecord, quant: QuantFacts, what: str, rounding: Rounding) -> Requantization:
    zero_points = (quant.input_zero_point, quant.output_zero_point)
    table = lookup_table(Op(record.op), quant.input_scales[0], quant.output_scale, record.attrs.alpha, zero_points, rounding)
    return Requantization([], [], None, "table", [int(v) for v in table])
