"""What a TOSA form is given (one op of the QDQ graph, its inputs as TOSA values) and the table of forms."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from edgeq.check.records import OpRecord
from edgeq.errors import ExportError
from edgeq.export.onnx_nodes import node_attributes
from edgeq.export.qdq_graph import QDQGraph
from edgeq.export.tosa.builder import TosaBuilder, TosaValue
from edgeq.op_attrs import OpAttrs
from edgeq.ops import Op, OpTable

if TYPE_CHECKING:
    from edgeq.compile.requantization import Requantization


@dataclass
class OpUnit:
    """One op of the QDQ graph as its TOSA form sees it.

    Attributes:
        op: the op.
        node: its (first) ONNX node; ``graph.members(node)`` are all of them (a MatMul's bias Add, a gate's Mul).
        record: the check's record of it (settings, quantization).
        graph: the QDQ graph.
        what: ``<op> '<node>'``, for messages.
        inputs: the TOSA values of its quantized inputs, in input order.
        outputs: the names of its quantized outputs (TOSA names its results after them).
    """

    op: Op
    node: onnx.NodeProto
    record: OpRecord
    graph: QDQGraph
    what: str
    inputs: list[TosaValue]
    outputs: list[str]

    @property
    def settings(self) -> OpAttrs:
        """The op's settings (:mod:`edgeq.op_attrs`: the check record's, as every stage reads them)."""
        if self.record.attrs is None:
            raise self.refuse("its settings could not be read from the file (a weight that is not a constant)")
        return self.record.attrs

    @property
    def attributes(self) -> dict[str, Any]:
        """The node's ONNX attributes: the ONNX form's details the settings do not hold (a Gemm's transposes, a
        pool's ``ceil_mode``), and the attributes of an op without settings (a transpose's ``perm``)."""
        return node_attributes(self.node)

    def output_shape(self, index: int = 0) -> tuple[int, ...]:
        """The logical shape of output ``index``."""
        shape = self.graph.static_shape(self.graph.members(self.node)[-1].output[index])
        if shape is None:
            raise self.refuse("its output has no static shape; export with fixed input shapes")
        return shape

    def constant(self, tensor: str) -> np.ndarray:
        """The stored integers of a (dequantized) constant input."""
        dequantized = self.graph.dequantized(tensor)
        return self.graph.constants[dequantized[0] if dequantized is not None else tensor]

    def refuse(self, problem: str) -> ExportError:
        """The error for settings this op's form does not take."""
        return ExportError(f"{self.what}: {problem}")

    def requantization(self) -> Requantization | None:
        """The op's integer constants under the file's rounding rule (:func:`edgeq.compile.requantization.
        requantization`: the ones compile and the NPU program use), or None for an op with an int32 output."""
        from edgeq.compile.requantization import requantization  # not at the top: edgeq.compile imports TVM

        return requantization(self.record, self.graph.qdq.rounding)


TosaForm = Callable[[TosaBuilder, OpUnit], list[TosaValue]]
"""Writes an op's TOSA operators and returns its results, one per output."""

TOSA_FORMS: OpTable[TosaForm] = OpTable("TOSA form in export/tosa/forms/", lambda info: False)
"""Each op's TOSA form. No op needs one everywhere: a target whose NPU takes TOSA (an Ethos-U target) needs one for
every op it places on its NPU, which ``tests/test_ops.py`` checks per target."""
