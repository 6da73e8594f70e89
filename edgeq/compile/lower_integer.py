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

The rules live in :mod:`edgeq.compile.lowering`, registered against their ops in ``LOWERING``; the integer
arithmetic they write is :mod:`edgeq.compile.integer_relax`.
"""

from __future__ import annotations

from tvm import relax

from edgeq.compile.integer_relax import rounding_rule
from edgeq.compile.lowering.rule import LOWERING, Lowering  # the package's import registers every rule
from edgeq.ops import Op
from edgeq.targets import Rounding


def lower_to_integer(func: relax.Function, rounding: Rounding = Rounding.HALF_TO_EVEN) -> relax.Function:
    """Rewrite every QDQ unit of ``func`` that fits docs/numerics.md into integer Relax ops (see module doc), ties
    rounded by the target's ``rounding``.

    Raises:
        QuantizationError: a unit fits but its scales need a multiplier outside the numerics' range.
    """
    with rounding_rule(rounding):
        for rule in _rules():
            func = rule(func)
    return func


def _rules() -> list[Lowering]:
    """Each op's rule, once, in the ops' declaration order (``linear`` before ``matmul``: a matmul of an int8
    constant is a linear layer's when its weights fit)."""
    return [factory() for factory in dict.fromkeys(LOWERING[op] for op in Op)]
