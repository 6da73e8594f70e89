"""Lowering of the table activations: one gather from ``numerics.lookup_table``, whichever form TVM imported.

Each table activation registers its form, the float computation TVM's ONNX frontend writes for it, in
:data:`TABLE_FORMS`: the one rule matches every registered form.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from tvm import relax
from tvm.relax import op as R
from tvm.relax.dpl import DFPattern, is_const, is_op, wildcard

from edgeq.compile.integer_relax import lowering_rounding
from edgeq.compile.lowering import qdq
from edgeq.compile.lowering.rule import LOWERING, Rule, dq, q
from edgeq.numerics import ACTIVATION_QMIN, lookup_table
from edgeq.ops import LOOKUP_TABLE_OPS, Op, OpTable


def _always(m: dict) -> bool:
    return True


def _no_slope(m: dict) -> float:
    return 0.0


@dataclass(frozen=True)
class TableForm:
    """One table activation as TVM imports it.

    Attributes:
        pattern: its float computation of the dequantized source.
        fits: whether a match's constants are the activation's (a match that does not fit stays in float).
        slope: the activation's constant in a match (``OpInfo.alpha``: LeakyReLU's negative slope, ELU's alpha; 0 for
            the others).
    """

    pattern: DFPattern
    fits: Callable[[dict], bool] = _always
    slope: Callable[[dict], float] = _no_slope


TABLE_FORMS: OpTable[Callable[[DFPattern], TableForm]] = OpTable(
    "Relax form in compile/lowering/lookup_table.py", needed=lambda info: info.lookup_table
)
"""Each table activation's form, built on the pattern of its dequantized source."""


def _unary(relax_op: str) -> Callable[[DFPattern], TableForm]:
    return lambda source: TableForm(is_op(relax_op)(source))


TABLE_FORMS.register(Op.SIGMOID)(_unary("relax.sigmoid"))
TABLE_FORMS.register(Op.TANH)(_unary("relax.tanh"))
TABLE_FORMS.register(Op.GELU)(_unary("relax.nn.gelu"))


@TABLE_FORMS.register(Op.LEAKYRELU)
def _leaky(source: DFPattern) -> TableForm:
    leaky = is_op("relax.nn.leakyrelu")(source)
    return TableForm(leaky, slope=lambda m: float(m[leaky].attrs.alpha))


@TABLE_FORMS.register(Op.ELU)
def _elu(source: DFPattern) -> TableForm:
    """``-alpha * relu(1 - exp(x)) + relu(x)``, TVM's import of ONNX ``Elu``."""
    negated_alpha, one = is_const(), is_const()
    relu = is_op("relax.nn.relu")
    elu = is_op("relax.add")(
        is_op("relax.multiply")(negated_alpha, relu(is_op("relax.subtract")(one, is_op("relax.exp")(source)))), relu(source)
    )

    def fits(m: dict) -> bool:
        return qdq.scalar(m[one]) == 1.0 and qdq.scalar(m[negated_alpha]) is not None

    return TableForm(elu, fits, slope=lambda m: -qdq.scalar(m[negated_alpha]))


@TABLE_FORMS.register(Op.HARDSIGMOID)
def _hard(source: DFPattern) -> TableForm:
    """``clip(alpha * x + beta, 0, 1)`` with ONNX HardSigmoid's torch constants (alpha 1/6, beta 0.5)."""
    alpha, beta = is_const(), is_const()
    hard = is_op("relax.clip")(is_op("relax.add")(is_op("relax.multiply")(alpha, source), beta), wildcard(), wildcard())

    def fits(m: dict) -> bool:
        slope, offset = (float(qdq.constant(m[c]).reshape(())) for c in (alpha, beta))
        bounds = [qdq.prim_float(m[hard].args[i]) for i in (1, 2)]
        return (slope, offset, *bounds) == (float(np.float32(1 / 6)), 0.5, 0.0, 1.0)

    return TableForm(hard, fits)


def _gated(gate: Op) -> Callable[[DFPattern], TableForm]:
    """The form of ``x * gate(x)``: TVM's import of the gate's node followed by a ``Mul`` with its input."""

    def form(source: DFPattern) -> TableForm:
        inner = TABLE_FORMS[gate](source)
        return TableForm(is_op("relax.multiply")(source, inner.pattern), inner.fits, inner.slope)

    return form


TABLE_FORMS.register(Op.SILU)(_gated(Op.SIGMOID))
TABLE_FORMS.register(Op.HARDSWISH)(_gated(Op.HARDSIGMOID))


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


@TABLE_FORMS.register(Op.GELU_TANH)
def _gelu_tanh(source: DFPattern) -> TableForm:
    """``relax.nn.gelu_tanh``, or the import of ``FastGelu`` with its constants."""
    fast_gelu, fast_constants = _fast_gelu(source)

    def fits(m: dict) -> bool:
        return fast_gelu not in m or [qdq.scalar(m[c]) for c in fast_constants] == [float(np.float32(v)) for v in FAST_GELU_CONSTANTS]

    return TableForm(is_op("relax.nn.gelu_tanh")(source) | fast_gelu, fits)


@LOWERING.register(*LOOKUP_TABLE_OPS)
def _lookup_table_rule() -> Rule:
    """Table activations (as TVM imports each ONNX form, :data:`TABLE_FORMS`): one gather from
    ``numerics.lookup_table``."""
    source = dq()
    forms = {op: TABLE_FORMS[op](source) for op in LOOKUP_TABLE_OPS}
    alternatives = [form.pattern for form in forms.values()]
    any_form = alternatives[0]
    for alternative in alternatives[1:]:
        any_form = any_form | alternative
    quantize = q(any_form)

    def rewrite(matched: relax.Call, m: dict) -> relax.Expr | None:
        source_quant, output = qdq.input_activation(m[source]), qdq.output_activation(matched)
        op, form = next((op, form) for op, form in forms.items() if form.pattern in m)
        if source_quant is None or output is None or not form.fits(m):
            return None
        zero_points = (source_quant.zero_point, output.zero_point)
        table = lookup_table(op, source_quant.scale, output.scale, form.slope(m), zero_points, lowering_rounding())
        index = R.add(R.astype(m[source].args[0], "int32"), relax.const(-ACTIVATION_QMIN, "int32"))
        return R.take(relax.const(table, "int8"), index, axis=0, mode="clip")  # indices are in [0, 255]: clip is a no-op

    return Rule("lookup table", quantize, rewrite)
