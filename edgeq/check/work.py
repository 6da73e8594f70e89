"""What an op computes per inference: its multiply-accumulates and its other elementary operations.

One definition for every stage: the check's MAC share, the compiled graph's ``macs`` and ``ops`` and the perf
estimator read it. MACs are the products summed by conv2d, linear and matmul (the work of an NPU's MAC array and
of the CPU's int8 matrix kernels); everything else an op does per element (an add's scaled inputs, a pool's
window, a comparison, a copy, a table look-up) is an operation. docs/artifact.md gives the formula per op.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

from edgeq.op_attrs import Conv2dAttrs, LinearAttrs, MatMulAttrs, OpAttrs, PoolAttrs
from edgeq.ops import LOOKUP_TABLE_OPS, Op, OpTable, op_named

Shape = Sequence[int]


class Work(NamedTuple):
    """An op's work per inference."""

    macs: int
    """Multiply-accumulates (conv2d, linear, matmul)."""
    non_mac_ops: int
    """Elementary operations that are not MACs."""


WorkOf = Callable[[OpAttrs | None, list[Shape], int], Work]
"""An op's work from its settings (an operation per output element when they are not the op's class: unknown),
its input shapes and its output's element count."""

WORK: OpTable[WorkOf] = OpTable("work (MACs and operations) in check/work.py")
"""Each op's :data:`WorkOf`."""


def work(op: str, attributes: OpAttrs | None, input_shapes: Sequence[Shape], output_shape: Shape | None) -> Work:
    """(MACs, other elementary operations) of the op called ``op`` per inference; an op edgeq does not know does an
    operation per output element. Nothing for an output of unknown shape (``None``, or a dimension of -1)."""
    outputs = math.prod(output_shape) if output_shape and all(d > 0 for d in output_shape) else 0
    known = op_named(op)
    piece = WORK[known] if known is not None else None
    return piece(attributes, list(input_shapes), outputs) if piece is not None else Work(0, outputs)


@WORK.register(Op.CONV2D)
def _conv2d(attributes: OpAttrs | None, input_shapes: list[Shape], outputs: int) -> Work:
    if not isinstance(attributes, Conv2dAttrs):
        return Work(0, outputs)
    return Work(outputs * attributes.in_channels // attributes.groups * math.prod(attributes.kernel), 0)


@WORK.register(Op.LINEAR)
def _linear(attributes: OpAttrs | None, input_shapes: list[Shape], outputs: int) -> Work:
    return Work(outputs * attributes.in_features, 0) if isinstance(attributes, LinearAttrs) else Work(0, outputs)


@WORK.register(Op.MATMUL)
def _matmul(attributes: OpAttrs | None, input_shapes: list[Shape], outputs: int) -> Work:
    return Work(outputs * attributes.reduction_size, 0) if isinstance(attributes, MatMulAttrs) else Work(0, outputs)


@WORK.register(Op.ADD, Op.MUL)
def _per_input(attributes: OpAttrs | None, input_shapes: list[Shape], outputs: int) -> Work:
    """Each input scaled by its multiplier and combined."""
    return Work(0, outputs * max(len(input_shapes), 1))


@WORK.register(Op.MAX_POOL2D, Op.AVG_POOL2D)
def _window(attributes: OpAttrs | None, input_shapes: list[Shape], outputs: int) -> Work:
    """A comparison or a sum per element of each window."""
    return Work(0, outputs * math.prod(attributes.kernel)) if isinstance(attributes, PoolAttrs) else Work(0, outputs)


@WORK.register(Op.GLOBAL_AVG_POOL2D)
def _global_pool(attributes: OpAttrs | None, input_shapes: list[Shape], outputs: int) -> Work:
    """A sum per input element."""
    return Work(0, math.prod(input_shapes[0])) if input_shapes else Work(0, outputs)


@WORK.register(
    Op.RELU,
    Op.CONCAT,
    Op.UPSAMPLE_NEAREST2D,
    Op.UPSAMPLE_BILINEAR2D,
    Op.RESHAPE,
    Op.TRANSPOSE,
    Op.SPLIT,
    Op.SLICE,
    Op.PAD,
    *LOOKUP_TABLE_OPS,
)
def _per_output(attributes: OpAttrs | None, input_shapes: list[Shape], outputs: int) -> Work:
    """A clamp, copy or table look-up per output element."""
    return Work(0, outputs)
