"""The integer ops of edgeq, each declared once.

An :class:`Op` is one integer op after fusion, by the name that check records, target files (``[npu] ops``),
the NPU program and the compiler's lowering use. Its :class:`OpInfo` holds what every layer needs to know about
it. Each layer registers its own piece against the op in an :class:`OpTable` (``@CONVERTERS.register(Op.ADD)``),
the way TVM registers an operator's attributes against the operator, and finds it by asking for the op;
``tests/test_ops.py`` walks every table and fails on a missing piece. docs/architecture.md "Adding an op" lists
the pieces.

This module imports nothing of edgeq's and nothing heavy, so that every layer (targets included) can use it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class OpInfo:
    """What every layer knows about one op.

    Attributes:
        onnx_types: the ONNX op types that read as this op between DequantizeLinear and QuantizeLinear (the
            check refines some by their attributes, e.g. ``Resize`` by its mode, ``Gelu`` by its approximation, and
            ``MatMul`` by its inputs: a weight makes it ``linear``, a second activation ``matmul``).
        movement: the op only moves int8 values (same scale in and out; a pad writes the zero point, 0 in
            edgeq's models): there is no canonical QAT op and no integer op for it, the fx node is kept as the
            user wrote it.
        weighted: int8 per-channel weights and an int32 bias; the output may be int32.
        requantizes: the output scale differs from the input's, so the NPU program carries requantization
            constants for it.
        npu_limits: a target file describes its NPU's limits for this op in an ``[npu.<op>]`` section.
        lookup_table: an elementwise activation computed as an int8 table (its real function is in
            ``edgeq.numerics.TABLE_FUNCTIONS``).
        gated: the op is ``x * g(x)`` for the op ``g`` named here (SiLU is ``x * sigmoid(x)``): its QDQ unit is
            ``g``'s ONNX node followed by a ``Mul`` with ``g``'s input, so it has no ONNX type of its own.
        alpha: a lookup-table activation's one constant, ``(name, default)``: ``name`` is its PyTorch argument and
            module attribute (LeakyReLU's ``negative_slope``), ONNX calls it ``alpha`` with the same default; the
            table and torch functions take it as ``alpha``. ``None``: the activation has no constant.
    """

    onnx_types: tuple[str, ...] = ()
    movement: bool = False
    weighted: bool = False
    requantizes: bool = False
    npu_limits: bool = False
    lookup_table: bool = False
    gated: str | None = None
    alpha: tuple[str, float] | None = None


class Op(StrEnum):
    """edgeq's integer ops after fusion (the ``op`` of a check record, the names of ``[npu] ops``)."""

    CONV2D = "conv2d"
    LINEAR = "linear"
    ADD = "add"
    CONCAT = "concat"
    MAX_POOL2D = "max_pool2d"
    AVG_POOL2D = "avg_pool2d"
    GLOBAL_AVG_POOL2D = "global_avg_pool2d"
    RELU = "relu"
    UPSAMPLE_NEAREST2D = "upsample_nearest2d"
    UPSAMPLE_BILINEAR2D = "upsample_bilinear2d"
    MUL = "mul"
    MATMUL = "matmul"
    SIGMOID = "sigmoid"
    TANH = "tanh"
    HARDSIGMOID = "hardsigmoid"
    HARDSWISH = "hardswish"
    SILU = "silu"
    LEAKYRELU = "leakyrelu"
    GELU = "gelu"
    GELU_TANH = "gelu_tanh"
    ELU = "elu"
    RESHAPE = "reshape"
    TRANSPOSE = "transpose"
    SPLIT = "split"
    SLICE = "slice"
    PAD = "pad"

    @property
    def info(self) -> OpInfo:
        """The op's declaration."""
        return _INFO[self]


_INFO: dict[Op, OpInfo] = {
    Op.CONV2D: OpInfo(("Conv",), weighted=True, requantizes=True, npu_limits=True),
    Op.LINEAR: OpInfo(("Gemm", "MatMul"), weighted=True, requantizes=True, npu_limits=True),
    Op.ADD: OpInfo(("Add",), requantizes=True),
    Op.CONCAT: OpInfo(("Concat",), requantizes=True),
    Op.MAX_POOL2D: OpInfo(("MaxPool",), npu_limits=True),
    Op.AVG_POOL2D: OpInfo(("AveragePool",), requantizes=True, npu_limits=True),
    Op.GLOBAL_AVG_POOL2D: OpInfo(("GlobalAveragePool",), requantizes=True),
    Op.RELU: OpInfo(("Relu", "Clip")),
    Op.UPSAMPLE_NEAREST2D: OpInfo(("Resize",), npu_limits=True),
    Op.UPSAMPLE_BILINEAR2D: OpInfo(("Resize",), requantizes=True),
    Op.MUL: OpInfo(("Mul",), requantizes=True),
    Op.MATMUL: OpInfo(("MatMul",), requantizes=True),
    Op.SIGMOID: OpInfo(("Sigmoid",), requantizes=True, lookup_table=True),
    Op.TANH: OpInfo(("Tanh",), requantizes=True, lookup_table=True),
    Op.HARDSIGMOID: OpInfo(("HardSigmoid",), requantizes=True, lookup_table=True),
    Op.HARDSWISH: OpInfo(requantizes=True, lookup_table=True, gated="hardsigmoid"),
    Op.SILU: OpInfo(requantizes=True, lookup_table=True, gated="sigmoid"),
    Op.LEAKYRELU: OpInfo(("LeakyRelu",), requantizes=True, lookup_table=True, alpha=("negative_slope", 0.01)),
    Op.GELU: OpInfo(("Gelu",), requantizes=True, lookup_table=True),
    Op.GELU_TANH: OpInfo(("FastGelu",), requantizes=True, lookup_table=True),
    Op.ELU: OpInfo(("Elu",), requantizes=True, lookup_table=True, alpha=("alpha", 1.0)),
    Op.RESHAPE: OpInfo(("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"), movement=True),
    Op.TRANSPOSE: OpInfo(("Transpose",), movement=True),
    Op.SPLIT: OpInfo(("Split",), movement=True),
    Op.SLICE: OpInfo(("Slice",), movement=True),
    Op.PAD: OpInfo(("Pad",), movement=True),
}

OP_NAMES: tuple[str, ...] = tuple(op.value for op in Op)
"""Every op's name, in declaration order."""


def op_of_onnx_type(op_type: str) -> Op | None:
    """The op an ONNX node of ``op_type`` reads as (``None`` for a type edgeq has no integer op for): the first op
    that declares the type; ``edgeq.export.onnx_nodes.node_op`` refines it by the node's attributes (a ``Resize``
    of mode ``linear`` is ``upsample_bilinear2d``) and inputs (a ``MatMul`` of two activations is ``matmul``)."""
    return _BY_ONNX_TYPE.get(op_type)


_BY_ONNX_TYPE: dict[str, Op] = {op_type: op for op in reversed(list(Op)) for op_type in op.info.onnx_types}
"""Built in reverse declaration order, so that the first op declaring a type keeps it."""

LOOKUP_TABLE_OPS: tuple[Op, ...] = tuple(op for op in Op if op.info.lookup_table)
"""The activations computed as int8 lookup tables."""


def gated_op(op: Op) -> Op | None:
    """The op ``x * op(x)`` is (SiLU for sigmoid, Hardswish for Hardsigmoid), if any."""
    return next((gated for gated in Op if gated.info.gated == op.value), None)


class OpTable(Generic[T]):
    """One layer's piece of each op, registered against the op and found by asking for it.

    Args:
        piece: what the layer registers, for messages and the registry test (``"converter in convert.py"``).
        needed: which ops must have this piece (all of them by default).
    """

    def __init__(self, piece: str, needed: Callable[[OpInfo], bool] = lambda info: True) -> None:
        self.piece = piece
        self.needed = needed
        self._entries: dict[Op, T] = {}
        TABLES.append(self)

    def register(self, *ops: Op) -> Callable[[T], T]:
        """Decorator: ``value`` is this layer's piece of each of ``ops``."""

        def decorate(value: T) -> T:
            for op in ops:
                if op in self._entries:
                    raise ValueError(f"{self.piece}: {op.value} is registered twice")
                self._entries[op] = value
            return value

        return decorate

    def __getitem__(self, op: Op) -> T:
        if op not in self._entries:
            raise KeyError(f"{op.value} has no {self.piece} (see docs/architecture.md, 'Adding an op')")
        return self._entries[op]

    def get(self, op: Op) -> T | None:
        """The piece of ``op``, or ``None`` when it has none."""
        return self._entries.get(op)

    def __contains__(self, op: object) -> bool:
        return op in self._entries

    def op_of_instance(self, instance: object) -> Op | None:
        """The op an object of a registered class is: its own ``op`` attribute when its class serves several ops
        (one lookup-table module for every table activation), else its class's op."""
        own = getattr(instance, "op", None)
        return own if isinstance(own, Op) else self.op_of(type(instance))

    def op_of(self, value: object) -> Op | None:
        """The op whose piece ``value`` is (the first, when several share it)."""
        return next((op for op, entry in self._entries.items() if entry is value), None)

    def missing(self) -> list[Op]:
        """The ops that need this piece and have none (the registry test asserts there are none)."""
        return [op for op in Op if self.needed(op.info) and op not in self._entries]


TABLES: list[OpTable] = []
"""Every layer's table, in import order (filled as the layers are imported)."""


# ---- looking an op up by its name (check records and graph.json carry an op's name) ----------------------------


def op_named(name: str) -> Op | None:
    """The op called ``name`` (an :class:`Op` is its own name), ``None`` for an op edgeq has no integer form of
    (a check record's lowercase foreign name, such as ``logsoftmax``)."""
    return Op(name) if name in OP_NAMES else None
