"""Lowering of the products of two activations: mul (elementwise) and matmul."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import tvm
from tvm import relax
from tvm.relax import op as R
from tvm.relax.dpl import is_op

from edgeq.compile.integer_relax import Activation, centred, lowering_rounding, requantize
from edgeq.compile.lowering import qdq
from edgeq.compile.lowering.rule import LOWERING, Rule, dq, q
from edgeq.numerics import check_product_accumulator_bound, product_accumulator_bound, product_multiplier
from edgeq.ops import Op

Accumulate = Callable[[Sequence[relax.Expr], Sequence[Activation]], "tuple[relax.Expr, int] | None"]
"""How a product of two activations sums: (the exact accumulator of ``Σ (a - z_a)(b - z_b)``, the products per
output), or None when it does not fit."""


def _product_rule(name: str, relax_op: str, accumulate: Accumulate) -> Rule:
    """A product of two dequantized activations, ``relax_op(a, b)``, requantized with the multiplier of
    ``numerics.product_multiplier`` (mul and matmul share it: ``m = s_a * s_b / s_out``)."""
    left, right = dq(), dq()
    quantize = q(is_op(relax_op)(left, right))

    def rewrite(matched: relax.Call, m: dict) -> relax.Expr | None:
        inputs, output = (qdq.input_activation(m[left]), qdq.input_activation(m[right])), qdq.output_activation(matched)
        if None in inputs or output is None:
            return None
        accumulated = accumulate([m[d].args[0] for d in (left, right)], inputs)
        if accumulated is None:
            return None
        acc, reduction_size = accumulated
        zero_points = [i.zero_point for i in inputs]
        multiplier = product_multiplier(
            [i.scale for i in inputs],
            output.scale,
            what=name,
            zero_points=zero_points,
            reduction_size=reduction_size,
            rounding=lowering_rounding(),
        )
        bound = product_accumulator_bound(reduction_size, zero_points)
        return requantize(acc, [multiplier], len(matched.ty.shape), 0, output.zero_point, [bound])

    return Rule(name, quantize, rewrite)


@LOWERING.register(Op.MUL)
def _mul_rule() -> Rule:
    """Elementwise product (broadcasting): int32 product of the int8 values less their zero points (at most
    ``2**16``), then requantization."""

    def product(values: Sequence[relax.Expr], inputs: Sequence[Activation]) -> tuple[relax.Expr, int]:
        return R.multiply(*(centred(v, i.zero_point) for v, i in zip(values, inputs))), 1

    return _product_rule("mul", "relax.multiply", product)


@LOWERING.register(Op.MATMUL)
def _matmul_rule() -> Rule:
    """Matrix product of two activations (the last two axes; leading axes broadcast, as ONNX MatMul and torch): the
    int8 x int8 -> int32 matmul, zero-point corrections, then requantization (docs/numerics.md, "Matrix product")."""
    return _product_rule("matmul", "relax.matmul", _matmul_accumulator)


def _matmul_accumulator(values: Sequence[relax.Expr], inputs: Sequence[Activation]) -> tuple[relax.Expr, int] | None:
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
