"""Op records from a QDQ ONNX model: every node other than QuantizeLinear / DequantizeLinear is one op.

The quantization of an op is read from the DequantizeLinear nodes feeding it and the QuantizeLinear consuming
its output; a weight or bias is a constant behind a DequantizeLinear. Data edges skip the Q/DQ pairs, so that
``inputs`` name the ops (or model inputs) that produce each value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx

from edgeq.check.records import INPUT_PREFIX, OpRecord, QuantFacts, foreign_op_name
from edgeq.errors import QuantizationError
from edgeq.export.float_onnx import FLOAT_FALLBACK_DOC
from edgeq.export.onnx_nodes import QUANTIZE_NODES, attribute_text, node_attributes, node_name, resize_follows_sizes
from edgeq.export.onnx_reader import QDQModel, QuantParams
from edgeq.export.qdq_graph import QDQGraph
from edgeq.export.qoperator import INTEGER_ONLY
from edgeq.numerics import accumulator_bias, accumulator_bounds, resize_align_corners
from edgeq.op_attrs import (
    BilinearResizeAttrs,
    Conv2dAttrs,
    LinearAttrs,
    LookupTableAttrs,
    MatMulAttrs,
    NearestResizeAttrs,
    OpAttrs,
    PoolAttrs,
)
from edgeq.ops import LOOKUP_TABLE_OPS, Op, OpTable, gated_op
from edgeq.targets import Rounding


def records_from_qdq(qdq: QDQModel) -> list[OpRecord]:
    """One record per compute node of the QDQ model, in graph order."""
    return _OnnxWalker(qdq).run()


class _OnnxWalker(QDQGraph):
    def __init__(self, qdq: QDQModel) -> None:
        super().__init__(qdq)
        self.problems = _tensor_problems(qdq)
        for finding in qdq.findings:
            if finding.kind == "bias_scale":
                self.problems.setdefault(finding.node, []).append(finding.message)

    def run(self) -> list[OpRecord]:
        return [self._record(node) for node in self.ops]

    # ---- following values through Q/DQ ----------------------------------------------------------------------
    def _source(self, tensor: str) -> str:
        """The op (or ``input:<name>``) that produces ``tensor``, skipping QuantizeLinear / DequantizeLinear."""
        while True:
            if tensor in self.inputs:
                return INPUT_PREFIX + tensor
            node = self.producer[tensor]
            if node.op_type not in QUANTIZE_NODES:
                return self.op_name(node)
            tensor = node.input[0]

    def _output_quant(self, node: onnx.NodeProto) -> QuantParams | None:
        consumers = self.consumers.get(self.op_output(node), [])
        quantizers = [c for c in consumers if c.op_type == "QuantizeLinear"]
        return self.qdq.quant[quantizers[0].output[0]] if quantizers else None

    # ---- one record -------------------------------------------------------------------------------------------
    def _record(self, node: onnx.NodeProto) -> OpRecord:
        activations = self.activation_inputs(node)
        input_quant = [self.dequantized(t) for t in self.quantized_inputs(node)]
        output_quant = self._output_quant(node)
        weighted = self._weighted(node)
        int32_output = weighted and self._feeds_model_output(node)
        quantized = all(q is not None for q in input_quant) and bool(input_quant) and (
            output_quant is not None or int32_output
        )
        op, attrs = self._describe(node)
        record = OpRecord(
            name=node_name(node),
            op=op,
            source_op="+".join(n.op_type for n in self.members(node)) if node_name(node) in self.gate_muls else node.op_type,
            inputs=[self._source(t) for t in activations],
            input_shapes=[shape for shape in map(self.static_shape, activations) if shape is not None],
            output_shape=self.static_shape(self.op_output(node)),
            attrs=attrs,
            float_only=(not quantized and node.op_type not in INTEGER_ONLY) or node.doc_string.startswith(FLOAT_FALLBACK_DOC),
            float_reason=node.doc_string.removeprefix(FLOAT_FALLBACK_DOC) or None,
            onnx_op=node.op_type,
        )
        if quantized:
            record.quant = self._quant_facts(node, input_quant, output_quant)
        if quantized and record.output_shape is not None and len(record.input_shapes) == len(activations):
            record.rejected = _requantization_problem(record, self.qdq.rounding)
        return record

    def _feeds_model_output(self, node: onnx.NodeProto) -> bool:
        return any(self.op_output(node) == out.name for out in self.qdq.model.graph.output)

    def _quant_facts(
        self,
        node: onnx.NodeProto,
        input_quant: list[tuple[str, QuantParams] | None],
        output_quant: QuantParams | None,
    ) -> QuantFacts:
        facts = QuantFacts(
            input_scales=tuple(q[1].scales[0] for q in input_quant if q is not None),
            output_scale=output_quant.scales[0] if output_quant is not None else None,
            input_zero_points=tuple(q[1].int8_zero_point for q in input_quant if q is not None),
            output_zero_point=output_quant.int8_zero_point if output_quant is not None else 0,
        )
        weight = self.dequantized(node.input[1]) if len(node.input) > 1 and self._weighted(node) else None
        if weight is not None:
            facts.weight_scales = weight[1].scales
            facts.accumulator_bounds = self._accumulator_bounds(node, weight[0], facts.input_zero_point)
        for quantized, _ in (q for q in input_quant if q is not None):
            facts.problems.extend(self.problems.get(quantized, []))
        for consumer in self.consumers.get(self.op_output(node), []):
            if consumer.op_type == "QuantizeLinear":
                facts.problems.extend(self.problems.get(consumer.output[0], []))
        facts.problems.extend(self.problems.get(node_name(node), []))
        return facts

    def _accumulator_bounds(self, node: onnx.NodeProto, weight: str, input_zero_point: int) -> tuple[int, ...]:
        values = self.constants.get(weight)
        if values is None or values.dtype != np.int8:
            return ()
        transposed = node.op_type == "Conv" or (node.op_type == "Gemm" and node_attributes(node).get("transB", 0))
        add = self.bias_adds.get(node_name(node))
        bias_input = [t for t in add.input if t != node.output[0]][0] if add is not None else (node.input[2:3] or [""])[0]
        axis = 0 if transposed else values.ndim - 1
        bias = self.dequantized(bias_input) if bias_input else None
        bias_values = self.constants.get(bias[0]) if bias is not None else None
        source, weight_quant = self.dequantized(node.input[0]), self.dequantized(node.input[1])
        if bias is not None and bias_values is not None and source is not None and weight_quant is not None:
            at_accumulator = accumulator_bias(bias_values, bias[1].scales, source[1].scales[0], weight_quant[1].scales)
            bias_values = at_accumulator if at_accumulator is not None else bias_values
        return tuple(accumulator_bounds(values, bias_values, axis, input_zero_point))

    def _weighted(self, node: onnx.NodeProto) -> bool:
        op = self.op_of(node)
        return op is not None and op.info.weighted

    def _describe(self, node: onnx.NodeProto) -> tuple[str, OpAttrs | None]:
        op = self.op_of(node)
        if op is None:
            return foreign_op_name(node.op_type), None
        if node_name(node) in self.gate_muls:
            op = gated_op(op)
        return ONNX_DESCRIPTIONS[op](self, node, op, node_attributes(node))

    def weight_shape(self, tensor: str) -> tuple[int, ...] | None:
        """The shape of the weight ``tensor`` (dequantized or not), ``None`` when it is not a constant."""
        dequantized = self.dequantized(tensor)
        name = dequantized[0] if dequantized is not None else tensor
        return tuple(self.constants[name].shape) if name in self.constants else None


Description = Callable[[_OnnxWalker, onnx.NodeProto, Op, dict[str, Any]], tuple[str, OpAttrs | None]]
"""The op name and settings (:mod:`edgeq.op_attrs`) of a node that reads as an op, from the walker, the node, the
op and the node's attributes (an op that does not fit edgeq's form reads as its foreign name)."""

ONNX_DESCRIPTIONS: OpTable[Description] = OpTable("check record in check/from_onnx.py")
"""What the check records of each op's ONNX node."""


@ONNX_DESCRIPTIONS.register(Op.MATMUL)
def _matmul(graph: _OnnxWalker, node: onnx.NodeProto, op: Op, attributes: dict[str, Any]) -> tuple[str, MatMulAttrs | None]:
    left = graph.static_shape(node.input[0])
    return Op.MATMUL.value, None if left is None else MatMulAttrs(left[-1])


@ONNX_DESCRIPTIONS.register(Op.CONV2D)
def _conv(graph: _OnnxWalker, node: onnx.NodeProto, op: Op, attributes: dict[str, Any]) -> tuple[str, Conv2dAttrs | None]:
    weight_shape = graph.weight_shape(node.input[1])
    if weight_shape is None:
        return "conv2d", None
    groups = int(attributes.get("group", 1))
    padding, uneven_padding = _window_padding(attributes)
    return "conv2d", Conv2dAttrs(
        kernel=tuple(attributes.get("kernel_shape", weight_shape[2:])),
        stride=tuple(attributes.get("strides", (1, 1))),
        padding=padding,
        uneven_padding=uneven_padding,
        dilation=tuple(attributes.get("dilations", (1, 1))),
        groups=groups,
        in_channels=weight_shape[1] * groups,
        out_channels=weight_shape[0],
    )


@ONNX_DESCRIPTIONS.register(Op.LINEAR)
def _linear(graph: _OnnxWalker, node: onnx.NodeProto, op: Op, attributes: dict[str, Any]) -> tuple[str, LinearAttrs | None]:
    """A Gemm, or a MatMul with a weight."""
    weight_shape = graph.weight_shape(node.input[1])
    if weight_shape is None:
        return "linear", None
    transposed = node.op_type == "Gemm" and attributes.get("transB", 0)
    out_features, in_features = weight_shape if transposed else weight_shape[::-1]
    return "linear", LinearAttrs(in_features=in_features, out_channels=out_features)


@ONNX_DESCRIPTIONS.register(Op.MAX_POOL2D, Op.AVG_POOL2D)
def _pool(graph: _OnnxWalker, node: onnx.NodeProto, op: Op, attributes: dict[str, Any]) -> tuple[str, PoolAttrs]:
    padding, uneven_padding = _window_padding(attributes)
    return op.value, PoolAttrs(
        kernel=tuple(attributes["kernel_shape"]),
        stride=tuple(attributes.get("strides", (1, 1))),
        padding=padding,
        uneven_padding=uneven_padding,
    )


def _window_padding(attributes: dict[str, Any]) -> tuple[tuple[int, int], tuple[int, int, int, int] | None]:
    """A window's ``padding`` (each dimension's larger side) and ``uneven_padding`` (ONNX's ``pads`` where a
    dimension's two sides differ, else None)."""
    pads = tuple(int(p) for p in attributes.get("pads", (0, 0, 0, 0)))
    padding = (max(pads[0], pads[2]), max(pads[1], pads[3]))
    return padding, pads if pads != (*padding, *padding) else None


@ONNX_DESCRIPTIONS.register(Op.UPSAMPLE_NEAREST2D, Op.UPSAMPLE_BILINEAR2D)
def _resize(graph: _OnnxWalker, node: onnx.NodeProto, op: Op, attributes: dict[str, Any]) -> tuple[str, OpAttrs | None]:
    mode = attribute_text(attributes, "mode", "nearest")
    source, target = graph.static_shape(node.input[0]), graph.static_shape(node.output[0])
    if source is None or target is None or not resize_follows_sizes(node, graph.constants, source, target):
        return foreign_op_name(f"resize_{mode}"), None  # coordinates of its own scale: a float op (docs/compile.md)
    if mode == "linear" and len(target) == 4:
        coordinates = attribute_text(attributes, "coordinate_transformation_mode", "half_pixel")
        align_corners = resize_align_corners(coordinates, target[2:])
        if align_corners is not None and not attributes.get("antialias", 0):
            return Op.UPSAMPLE_BILINEAR2D.value, BilinearResizeAttrs(align_corners)
    if mode != "nearest" or any(t % s for t, s in zip(target[2:], source[2:])):
        return foreign_op_name(f"resize_{mode}"), None
    return "upsample_nearest2d", NearestResizeAttrs(tuple(t // s for t, s in zip(target[2:], source[2:])))


@ONNX_DESCRIPTIONS.register(*LOOKUP_TABLE_OPS)
def _lookup_table(graph: _OnnxWalker, node: onnx.NodeProto, op: Op, attributes: dict[str, Any]) -> tuple[str, LookupTableAttrs]:
    alpha = float(attributes.get("alpha", op.info.alpha[1])) if op.info.alpha else 0.0  # ONNX's default is torch's
    return op.value, LookupTableAttrs(op.value, alpha)


@ONNX_DESCRIPTIONS.register(
    Op.ADD, Op.MUL, Op.CONCAT, Op.RELU, Op.GLOBAL_AVG_POOL2D, Op.RESHAPE, Op.TRANSPOSE, Op.SPLIT, Op.SLICE, Op.PAD
)
def _no_attributes(graph: _OnnxWalker, node: onnx.NodeProto, op: Op, attributes: dict[str, Any]) -> tuple[str, None]:
    """Ops whose ONNX node has no settings the check reads (the compiled graph keeps the node's attributes)."""
    return op.value, None


def _requantization_problem(record: OpRecord, rounding: Rounding) -> str | None:
    """Why the scales around a quantized op of static shapes give no requantization edgeq's integers represent (a
    multiplier outside ``[2**-32, 2**30)``), from the compiler's own constants, so that the check refuses what
    compile would; None when they give one. (An op with a dynamic dimension has constants only once compile is
    given its shape, and compile checks them then.)"""
    from edgeq.compile.requantization import requantization  # not at the top: edgeq.compile imports edgeq.check

    try:
        requantization(record, rounding)
    except QuantizationError as error:
        return str(error)
    return None


def _tensor_problems(qdq: QDQModel) -> dict[str, list[str]]:
    problems: dict[str, list[str]] = {}
    for tensor, params in qdq.quant.items():
        if not params.symmetric and params.dtype != "int32":
            problems.setdefault(tensor, []).append(
                f"'{tensor}' is {params.dtype} with zero point {params.zero_points[0]}"
            )
    return problems
