"""Partitioning a QDQ model into NPU and CPU regions, from the check report's placement.

The compiled program takes each model input already quantized (the runtime quantizes float inputs, or takes raw
int8) and returns each output as integers (int8, or the int32 accumulator of a high-precision output): the
integer program's boundary is where edgeq's numerics are exact. Inside, ops are cut into regions: runs of
consecutive ops (in the graph's topological order) with the same placement, so regions always form a chain of
calls without cycles. Each region becomes its own ONNX subgraph, cut at quantized tensors, which TVM imports
into a Relax function.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from edgeq.check.report import CheckReport, Placement
from edgeq.errors import CompileError
from edgeq.export.onnx_nodes import node_attributes, node_name
from edgeq.export.onnx_reader import QDQModel, QuantParams
from edgeq.export.qdq_graph import QDQGraph
from edgeq.numerics import accumulator_bias, bias_scales


@dataclass(frozen=True)
class TensorSpec:
    """A tensor at the compiled program's boundary: name, shape, dtype and quantization (None for float)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    quant: QuantParams | None
    source: str
    """The model's own input or output this tensor stands for."""


@dataclass
class Region:
    """A run of consecutive ops with one placement, and the tensors that cross its border."""

    index: int
    placement: Placement
    nodes: list[str]
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    output_producers: dict[str, str] = field(default_factory=dict)
    """Output tensor -> the op (node name) that makes it."""
    model: onnx.ModelProto | None = None
    """The region's ONNX subgraph, for TVM's importer (None for an int32 head)."""
    node_ops: dict[str, str] = field(default_factory=dict)
    """Each node of the region's ops -> the op it is (part of): a MatMul's bias Add is the MatMul's."""
    head: Int32Head | None = None

    @property
    def name(self) -> str:
        return f"region{self.index}_{self.placement.value.lower()}"


@dataclass
class Partition:
    """The compiled program's inputs and outputs and its regions, in call order."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    regions: list[Region]


def partition(qdq: QDQModel, report: CheckReport) -> Partition:
    """Regions of ``qdq`` per the placements of ``report`` (whose op names are the ONNX node names).

    Raises:
        CompileError: an op is unsupported on the target, or a model input/output has no static shape.
    """
    unsupported = [n for n in report.nodes if n.placement is Placement.UNSUPPORTED]
    if unsupported:
        first = unsupported[0]
        more = f" ({len(unsupported) - 1} more unsupported op(s); run edgeq check)" if len(unsupported) > 1 else ""
        raise CompileError(
            f"{first.record.source_op} '{first.record.name}' cannot run on {report.target.name}: "
            f"{'; '.join(r.message for r in first.reasons)}{more}"
        )
    graph = _Graph(qdq)
    model = graph.model
    heads = {h.node.output[0]: h for h in (graph.int32_head(o.name) for o in model.graph.output) if h is not None}
    inputs = [graph.input_spec(info) for info in model.graph.input]
    outputs = [graph.output_spec(info, heads.get(info.name)) for info in model.graph.output]
    placements = {n.record.name: n.placement for n in report.nodes}
    regions: list[Region] = []
    for node in graph.ops:
        head = heads.get(node.output[0])
        placement = placements[node_name(node)]
        if head is not None or not regions or regions[-1].placement is not placement or regions[-1].head is not None:
            regions.append(Region(len(regions), placement, [], head=head))
        regions[-1].nodes.append(node_name(node))
        regions[-1].node_ops.update((node_name(member), node_name(node)) for member in graph.members(node))
    graph.connect(regions, [s.name for s in inputs], [s.name for s in outputs])
    extractor = onnx.utils.Extractor(model)
    for region in regions:
        if region.head is None:
            region.model = extractor.extract_model(region.inputs, region.outputs)
    return Partition(inputs, outputs, regions)


def graph_of(qdq: QDQModel) -> _Graph:
    """The lookups over ``qdq`` that cut it into regions: tensors each op reads and makes, seen through Q/DQ."""
    return _Graph(qdq)


@dataclass(frozen=True)
class Int32Head:
    """A Conv or Gemm whose int32 accumulator is a model output (the high-precision preset), with its integer
    weights and bias. edgeq builds it directly in Relax (TVM's importer has no int32 quantize)."""

    node: onnx.NodeProto
    input_shape: tuple[int, ...]
    weights: np.ndarray
    bias: np.ndarray
    output: QuantParams


class _Graph(QDQGraph):
    """The QDQ lookups, and the program's boundary and region borders."""

    # ---- the program's boundary --------------------------------------------------------------------------------
    def _static_shape(self, name: str, what: str) -> tuple[int, ...]:
        shape = self.static_shape(name)
        if shape is None:
            raise CompileError(
                f"{self.qdq.source}: {what} '{name}' has no static shape ({list(self.shapes.get(name, []))}); give it one "
                f"(edgeq compile --input-shape {name}=1x3x224x224)"
            )
        return shape

    def input_spec(self, info: onnx.ValueInfoProto) -> TensorSpec:
        consumers = self.consumers.get(info.name, [])
        shape = self._static_shape(info.name, "input")
        integer = _integer_dtype(info)
        if integer is not None:  # the file's integers, taken as they are
            return TensorSpec(info.name, shape, integer, None, info.name)
        if consumers and all(c.op_type == "QuantizeLinear" for c in consumers) and len({c.output[0] for c in consumers}) == 1:
            quantized = consumers[0].output[0]
            params = self.qdq.quant[quantized]
            return TensorSpec(quantized, shape, params.dtype, params, info.name)
        return TensorSpec(info.name, shape, "float32", None, info.name)

    def output_spec(self, info: onnx.ValueInfoProto, head: Int32Head | None) -> TensorSpec:
        node = self.producer.get(info.name)
        shape = self._static_shape(info.name, "output")
        integer = _integer_dtype(info)
        if integer is not None and head is None:  # the file's integers, given as they are
            return TensorSpec(info.name, shape, integer, None, info.name)
        if node is not None and node.op_type == "DequantizeLinear" and node.input[0] not in self.constants:
            params = self.qdq.quant[node.input[0]]
            return TensorSpec(node.input[0], shape, params.dtype, params, info.name)
        if head is not None:
            return TensorSpec(info.name, shape, "int32", head.output, info.name)
        return TensorSpec(info.name, shape, "float32", None, info.name)

    def int32_head(self, output: str) -> Int32Head | None:
        """The Conv/Gemm making model output ``output`` when its int32 accumulator fits edgeq's numerics."""
        node = self.producer.get(output)
        if node is None or node.op_type not in ("Conv", "Gemm") or len(node.input) < 3:
            return None
        attributes = node_attributes(node)
        if node.op_type == "Gemm" and (attributes.get("alpha", 1.0), attributes.get("beta", 1.0), attributes.get("transA", 0)) != (1.0, 1.0, 0):
            return None
        source, weights, bias = (self.dequantized(t) for t in node.input[:3])
        if source is None or weights is None or bias is None or weights[0] not in self.constants or bias[0] not in self.constants:
            return None
        if not source[1].symmetric or source[1].dtype != "int8" or len(source[1].scales) != 1:
            return None
        weight_values = self.constants[weights[0]]
        bias_values = self.constants[bias[0]]
        if weight_values.dtype != np.int8 or not weights[1].symmetric or bias_values.dtype != np.int32 or any(bias[1].zero_points):
            return None
        channels = weight_values.shape[0] if node.op_type == "Conv" or attributes.get("transB", 0) else weight_values.shape[1]
        weight_scales = list(weights[1].scales) * (channels if len(weights[1].scales) == 1 else 1)
        bias_values = accumulator_bias(bias_values, bias[1].scales, source[1].scales[0], weight_scales)
        if bias_values is None:
            return None
        expected = bias_scales(source[1].scales[0], weight_scales)
        axis = 1 if node.op_type == "Conv" else len(self.shapes[output]) - 1
        quant = QuantParams("int32", tuple(expected), (0,) * channels, axis)
        return Int32Head(node, self.shapes[source[0]], weight_values, bias_values.reshape(-1), quant)

    # ---- region borders ----------------------------------------------------------------------------------------
    def consumed(self, op: onnx.NodeProto) -> list[str]:
        """Tensors an op's nodes read, seen through DequantizeLinear (its quantized input) and not constants."""
        tensors = []
        for tensor in (t for node in self.members(op) for t in self.activation_inputs(node)):
            dequantized = self.dequantized(tensor)
            tensors.append(tensor if dequantized is None else dequantized[0])
        return tensors

    def produced(self, op: onnx.NodeProto) -> list[str]:
        """Tensors an op's nodes make, seen through QuantizeLinear (its quantized output); a float output also
        as it is when another node reads it unquantized (consecutive float ops of the float fallback)."""
        tensors = []
        for name in (t for node in self.members(op) for t in node.output):
            consumers = self.consumers.get(name, [])
            quantizers = [c for c in consumers if c.op_type == "QuantizeLinear"]
            tensors += [q.output[0] for q in quantizers]
            if not quantizers or len(quantizers) < len(consumers):
                tensors.append(name)
        return tensors

    def connect(self, regions: list[Region], program_inputs: list[str], program_outputs: list[str]) -> None:
        """Fill each region's inputs and outputs: tensors it reads from outside, and tensors it makes that a
        later region or the program's output reads."""
        by_name = {node_name(n): n for n in self.ops}
        made_in, made_by = {}, {}
        for region in regions:
            for op in region.nodes:
                for tensor in self.produced(by_name[op]):
                    made_in[tensor], made_by[tensor] = region.index, op
        for region in regions:
            for op in region.nodes:
                for tensor in self.consumed(by_name[op]):
                    origin = made_in.get(tensor)
                    if origin == region.index:
                        continue
                    if origin is None and tensor not in program_inputs:
                        raise CompileError(f"{self.qdq.source}: '{op}' reads '{tensor}', which no op or input makes")
                    if tensor not in region.inputs:
                        region.inputs.append(tensor)
                    if origin is not None and tensor not in regions[origin].outputs:
                        regions[origin].outputs.append(tensor)
        for tensor in program_outputs:
            origin = made_in.get(tensor)
            if origin is None and tensor in program_inputs:  # a quantized input as it is (a graph of one Q or DQ)
                continue
            if origin is None:
                raise CompileError(f"{self.qdq.source}: output '{tensor}' is not made by any op")
            if tensor not in regions[origin].outputs:
                regions[origin].outputs.append(tensor)
        for region in regions:
            region.output_producers = {tensor: made_by[tensor] for tensor in region.outputs}


def _integer_dtype(info: onnx.ValueInfoProto) -> str | None:
    """The numpy name of a graph input's or output's integer element type (uint8, int8, int32...); None for float."""
    dtype = onnx.helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type)
    return dtype.name if np.issubdtype(dtype, np.integer) else None
