"""A QDQ graph (a whole model or a run of its ops) as one TOSA graph: every op written by its registered form.

The TOSA graph reads and writes the integer tensors of the QDQ file: its inputs are the quantized tensors its ops
read and no op of it makes (a model's inputs after QuantStub), its outputs the quantized tensors its ops make that
something outside reads (a model's outputs before DeQuantStub; an int32 output is the accumulator). 4-D inputs and
outputs are NHWC (docs/export.md, "TOSA").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import tosa_serializer as ts

from edgeq.check.from_onnx import records_from_qdq
from edgeq.errors import ExportError
from edgeq.export.onnx_nodes import node_name
from edgeq.export.onnx_reader import QDQModel
from edgeq.export.qdq_graph import QDQGraph
from edgeq.export.tosa.builder import TosaBuilder, TosaOperator, TosaValue
from edgeq.export.tosa.forms import TOSA_FORMS, OpUnit
from edgeq.ops import Op
from edgeq.targets import Rounding


@dataclass(frozen=True)
class TosaTensor:
    """A tensor at the TOSA graph's border: the QDQ file's quantized tensor ``source``, its TOSA name, logical
    shape (the QDQ graph's), dtype and the physical order TOSA holds it in (``perm``: NHWC for 4-D tensors)."""

    source: str
    name: str
    shape: tuple[int, ...]
    dtype: str
    perm: tuple[int, ...]

    def to_tosa(self, values: np.ndarray) -> np.ndarray:
        """Values in the QDQ graph's order, in the TOSA graph's."""
        return np.ascontiguousarray(np.transpose(values, self.perm))

    def from_tosa(self, values: np.ndarray) -> np.ndarray:
        """Values in the TOSA graph's order, in the QDQ graph's."""
        return np.ascontiguousarray(np.transpose(np.reshape(values, [self.shape[a] for a in self.perm]), np.argsort(self.perm)))


@dataclass(frozen=True)
class TosaGraph:
    """A written TOSA graph: the flatbuffer, its border tensors in the order the graph lists them, and its operators
    in the order written, each with the QDQ graph's op it comes from."""

    flatbuffer: bytes
    inputs: tuple[TosaTensor, ...]
    outputs: tuple[TosaTensor, ...]
    operators: tuple[TosaOperator, ...]

    def source_of(self, tensor: str) -> str | None:
        """The QDQ graph's op whose form wrote TOSA tensor ``tensor``; for a tensor a compiler made from one and named
        with a suffix after ``_`` (Vela's ``conv2.q_int32``: the first half of a RESCALE of ``conv2.q``, which Vela
        splits in two), the op whose form rescales that tensor (or a SLICE of it: Vela runs a slice as no command of
        its own) where one does, or one whose output has the suffix's type; else the op that wrote it; None for
        inputs, constants and other names."""
        sources = {o.output: o.source for o in self.operators}
        base = tensor
        while base not in sources and "_" in base:
            base = base.rpartition("_")[0]
        if base != tensor:
            read = {base} | {o.output for o in self.operators if o.kind == "SLICE" and base in o.inputs}
            rescales = [o for o in self.operators if o.kind == "RESCALE" and read & set(o.inputs)]
            if len({o.source for o in rescales}) > 1:
                rescales = [o for o in rescales if o.dtype and o.dtype.lower() == tensor.rpartition("_")[2]]
            if len({o.source for o in rescales}) == 1:
                return rescales[0].source
        return sources.get(base)


def check_rounding(qdq: QDQModel) -> None:
    """TOSA's RESCALE rounds half up (SINGLE_ROUND): only a model whose integers round so (quantized for a target
    with ``rounding = "half_up"``: an Ethos-U target; the file's ``edgeq.rounding`` metadata) has a TOSA form
    computing its numbers.

    Raises:
        ExportError: the model rounds otherwise, naming it, its target and its rule.
    """
    if qdq.rounding is not Rounding.HALF_UP:
        quantized_for = f"quantized for '{qdq.target}', " if qdq.target else ""
        raise ExportError(
            f"{qdq.source}: {quantized_for}its integers round {qdq.rounding.value}; TOSA's RESCALE rounds "
            f"{Rounding.HALF_UP.value}, so only a model quantized for a target with rounding = "
            f"\"{Rounding.HALF_UP.value}\" (an Ethos-U target) has a TOSA form computing its numbers"
        )


def build_tosa(qdq: QDQModel, ops: Sequence[str] | None = None) -> TosaGraph:
    """The TOSA graph of the ops named ``ops`` of a QDQ model (all of them by default), in graph order.

    Raises:
        ExportError: a model that does not round half up (:func:`check_rounding`); an op without a TOSA form, an op
            left in float, an activation with a zero point, or settings a form does not take, naming the node and
            the op.
    """
    check_rounding(qdq)
    return _Writer(qdq, ops).run()


class _Writer:
    def __init__(self, qdq: QDQModel, ops: Sequence[str] | None) -> None:
        self.graph = QDQGraph(qdq)
        self.records = {record.name: record for record in records_from_qdq(qdq)}
        chosen = set(ops) if ops is not None else None
        self.ops = [op for op in self.graph.ops if chosen is None or node_name(op) in chosen]
        if chosen is not None and len(self.ops) != len(chosen):
            missing = sorted(chosen - {node_name(op) for op in self.ops})
            raise ExportError(f"{qdq.source}: no op named {', '.join(repr(m) for m in missing)}")
        self.builder = TosaBuilder()
        self.values: dict[str, TosaValue] = {}
        self.inputs: list[TosaTensor] = []

    def run(self) -> TosaGraph:
        for tensor in self._border_inputs():
            self._value(tensor, f"'{tensor}'")
        made_by: dict[str, str] = {}
        for op in self.ops:
            unit = self._unit(op)
            self.builder.source = node_name(op)
            results = TOSA_FORMS[unit.op](self.builder, unit)
            self.values.update(zip(unit.outputs, results, strict=True))
            made_by.update(dict.fromkeys(unit.outputs, node_name(op)))
        outputs = []
        for name in sorted(self._read_outside(), key=self._model_order):
            self.builder.source = made_by[name]
            outputs.append(self._output(name))
        return TosaGraph(self.builder.serialize(), tuple(self.inputs), tuple(outputs), tuple(self.builder.operators))

    def _border_inputs(self) -> list[str]:
        """The tensors the ops read and none of them makes, but constants: the model's inputs in its order, then
        the others in the order first read."""
        made = {name for op in self.ops for name in self._outputs(op)}
        read = [self._source(t) for op in self.ops for t in self.graph.quantized_inputs(op)]
        border = [t for t in dict.fromkeys(read) if t not in made and t not in self.graph.constants]
        return sorted(border, key=self._model_order)

    def _model_order(self, tensor: str) -> int:
        """Where a border tensor stands among the model's inputs (after QuantizeLinear) or outputs (before
        DequantizeLinear); tensors that are neither after them (a stable sort keeps their order)."""
        graph = self.graph.model.graph
        ends = [*(q.output[0] for i in graph.input for q in self.graph.consumers.get(i.name, []) if q.op_type == "QuantizeLinear")]
        ends += [self._source(o.name) for o in graph.output]
        return ends.index(tensor) if tensor in ends else len(ends)

    # ---- one op ----------------------------------------------------------------------------------------------------
    def _unit(self, node: onnx.NodeProto) -> OpUnit:
        name = node_name(node)
        record = self.records[name]
        what = f"{record.op} '{name}'"
        if not isinstance(record.op, Op) or record.op not in TOSA_FORMS:
            raise ExportError(f"{what}: has no TOSA form ({record.source_op}); such an op cannot go to an Ethos-U NPU")
        if record.float_only:
            reason = f": {record.float_reason}" if record.float_reason else ""
            raise ExportError(f"{what}: runs in float{reason}; a TOSA graph holds integer ops only")
        problems = record.quant.problems if record.quant is not None else []
        if problems:
            raise ExportError(f"{what}: {problems[0]}; TOSA forms take edgeq's symmetric int8 tensors")
        sources = [self._source(tensor) for tensor in self.graph.quantized_inputs(node)]
        return OpUnit(
            op=record.op, node=node, record=record, graph=self.graph, what=what,
            inputs=[self._value(tensor, what) for tensor in sources], outputs=self._outputs(node),
        )

    def _source(self, tensor: str) -> str:
        dequantized = self.graph.dequantized(tensor)
        return dequantized[0] if dequantized is not None else tensor

    def _value(self, tensor: str, what: str) -> TosaValue:
        """The TOSA value of a quantized tensor: made by an op before, a constant, or a new graph input."""
        if tensor in self.values:
            return self.values[tensor]
        shape = self.graph.static_shape(tensor)
        if shape is None:
            raise ExportError(f"{what}: '{tensor}' has no static shape; export with fixed input shapes")
        if tensor in self.graph.constants:
            values = self.graph.constants[tensor]
            if values.dtype != np.int8:
                raise ExportError(f"{what}: constant '{tensor}' is {values.dtype}; TOSA forms read int8 constants")
            value = TosaValue(self.builder.const(tensor, values, ts.DType.INT8), shape, ts.DType.INT8, tuple(range(len(shape))))
        else:
            params = self.graph.qdq.quant.get(tensor)
            if params is None or params.dtype != "int8":
                raise ExportError(f"{what}: reads '{tensor}', which is not an int8 tensor; a TOSA graph reads int8 tensors")
            value = self.builder.input(tensor, shape)
            self.inputs.append(TosaTensor(tensor, value.name, shape, "int8", value.perm))
        self.values[tensor] = value
        return value

    def _outputs(self, node: onnx.NodeProto) -> list[str]:
        """The op's results: each output's quantized tensor (the raw output when nothing quantizes it: an int32
        accumulator)."""
        names = []
        for output in self.graph.members(node)[-1].output:
            quantizers = [c for c in self.graph.consumers.get(output, []) if c.op_type == "QuantizeLinear"]
            names.append(quantizers[0].output[0] if quantizers else output)
        return names

    # ---- the graph's outputs ---------------------------------------------------------------------------------------
    def _read_outside(self) -> list[str]:
        """The tensors the ops make that the model's output or an op not written here reads, in the order made."""
        inside = {node_name(member) for op in self.ops for member in self.graph.members(op)}
        model_outputs = {output.name for output in self.graph.model.graph.output}

        def leaves(tensor: str) -> bool:
            for reader in self.graph.consumers.get(tensor, []):
                readers = [reader]
                if reader.op_type == "DequantizeLinear":
                    if reader.output[0] in model_outputs:
                        return True
                    readers = self.graph.consumers.get(reader.output[0], [])
                if any(node_name(r) not in inside for r in readers):
                    return True
            return tensor in model_outputs

        return [name for op in self.ops for name in self._outputs(op) if leaves(name)]

    def _output(self, tensor: str) -> TosaTensor:
        value = self.builder.output(self.values[tensor])
        dtype = "int8" if value.dtype == ts.DType.INT8 else "int32"
        return TosaTensor(tensor, value.name, value.shape, dtype, value.perm)
