"""ONNX's operator form of quantization (QOperator) as the standard QDQ form edgeq reads.

ONNX Runtime's ``quantize_static(..., quant_format=QuantFormat.QOperator)`` writes each quantized op as one node
that takes integers and their scales and zero points (``QLinearConv``, ``QLinearMatMul``, and its contrib ops
``QGemm``, ``QLinearAdd``, ``QLinearMul``, ``QLinearGlobalAveragePool``, ``QLinearConcat``, ...) and runs
data-movement ops (``MaxPool``, ``Flatten``, ...) on the integers directly. The same arithmetic in QDQ form is
``DequantizeLinear`` on each input, the float op, ``QuantizeLinear`` on the output (the int32 bias dequantized at
``s_in * s_w``), so :func:`qdq_from_qoperator` rewrites each such node so, and the rest of edgeq (check, compile,
the compiled graph) sees one form. The rewrite is exact: both forms define the same integers.

Dynamic quantization (``DynamicQuantizeLinear``: input scales computed at run time) has no fixed integer program
and is refused with that reason. ``ConvInteger`` / ``MatMulInteger`` with constant zero points (or none) are one,
and have no QDQ form (QuantizeLinear writes no int32): they stay as they are, and compile runs them exactly in
int32 on the CPU (:mod:`edgeq.compile.integer_only`); computed zero points are refused as dynamic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeq.errors import ModelFileError

DATA_MOVEMENT = {"MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Resize", "Slice", "Identity"}
"""Ops ONNX Runtime runs on quantized integers unchanged (their output keeps the input's scale and zero point)."""

DYNAMIC = {"DynamicQuantizeLinear"}
INTEGER_ONLY = {"ConvInteger", "MatMulInteger"}


@dataclass(frozen=True)
class _Quant:
    """Names of a quantized tensor's scale and zero point."""

    scale: str
    zero_point: str


@dataclass(frozen=True)
class _Form:
    """Where a QOperator node keeps its operands: ``(tensor, scale, zero point)`` input indices, the output's
    scale and zero point indices, the bias index, whether its second operand is a weight (per-channel scales
    along :func:`_weight_axis`), and the float op it computes."""

    op_type: str
    inputs: tuple[tuple[int, int, int], ...]
    output: tuple[int, int]
    bias: int | None = None
    weighted: bool = False


FORMS: dict[str, _Form] = {
    "QLinearConv": _Form("Conv", ((0, 1, 2), (3, 4, 5)), (6, 7), bias=8, weighted=True),
    "QLinearMatMul": _Form("MatMul", ((0, 1, 2), (3, 4, 5)), (6, 7)),
    "QGemm": _Form("Gemm", ((0, 1, 2), (3, 4, 5)), (7, 8), bias=6, weighted=True),
    "QLinearAdd": _Form("Add", ((0, 1, 2), (3, 4, 5)), (6, 7)),
    "QLinearMul": _Form("Mul", ((0, 1, 2), (3, 4, 5)), (6, 7)),
    "QLinearGlobalAveragePool": _Form("GlobalAveragePool", ((0, 1, 2),), (3, 4)),
    "QLinearAveragePool": _Form("AveragePool", ((0, 1, 2),), (3, 4)),
    "QLinearSigmoid": _Form("Sigmoid", ((0, 1, 2),), (3, 4)),
    "QLinearLeakyRelu": _Form("LeakyRelu", ((0, 1, 2),), (3, 4)),
}
"""Every QOperator op edgeq rewrites (``QLinearConcat``, whose operands are variadic, is handled apart)."""

OPERATOR_FORM = {*FORMS, "QLinearConcat", *DYNAMIC, *INTEGER_ONLY}
"""The op types that make a file the operator form (dynamic quantization and integer-only ops included, to be
refused)."""


def is_qoperator(model: onnx.ModelProto) -> bool:
    """Whether ``model`` uses the operator form (or dynamic quantization)."""
    return any(node.op_type in OPERATOR_FORM for node in model.graph.node)


def qdq_from_qoperator(model: onnx.ModelProto, path: str) -> onnx.ModelProto:
    """The QDQ form of a QOperator model (module doc).

    Raises:
        ModelFileError: dynamic quantization, an integer-only op, or a QOperator node edgeq cannot rewrite (named,
            with the reason).
    """
    return _Rewriter(model, path).run()


class _Rewriter:
    def __init__(self, model: onnx.ModelProto, path: str) -> None:
        self.source = model
        self.path = path
        self.result = onnx.ModelProto()
        self.result.CopyFrom(model)
        self.graph = self.result.graph
        self.constants = {t.name: numpy_helper.to_array(t) for t in self.graph.initializer}
        self.quant: dict[str, _Quant] = {}
        self.nodes: list[onnx.NodeProto] = []
        self.dequantized_biases: set[str] = set()
        self.constant_nodes = {n.output[0] for n in self.graph.node if n.op_type == "Constant"}

    def run(self) -> onnx.ModelProto:
        for node in self.source.graph.node:
            self._node(node)
        del self.graph.node[:]
        self.graph.node.extend(self.nodes)
        del self.graph.value_info[:]  # tensors changed type (integers became float between DQ and Q)
        kept = [o for o in self.result.opset_import if o.domain != "com.microsoft"]  # its contrib ops are gone
        del self.result.opset_import[:]
        self.result.opset_import.extend(kept)
        return self.result

    def _error(self, node: onnx.NodeProto, problem: str) -> ModelFileError:
        return ModelFileError(f"{self.path}: {node.op_type} '{node.name or node.output[0]}': {problem}")

    def _node(self, node: onnx.NodeProto) -> None:
        if node.op_type in DYNAMIC:
            raise self._error(
                node,
                "dynamic quantization (scales computed at run time) has no fixed integer program; quantize the model "
                "statically (onnxruntime.quantization.quantize_static, QDQ or QOperator format) and compile that",
            )
        if node.op_type in INTEGER_ONLY:
            for name in filter(None, node.input[2:4]):
                if name not in self.constants and name not in self.constant_nodes:
                    raise self._error(
                        node,
                        f"zero point '{name}' is computed when the model runs (dynamic quantization) and has no fixed "
                        "integer program; quantize the model statically (onnxruntime.quantization.quantize_static) "
                        "or give the op constant zero points",
                    )
        if node.op_type == "QuantizeLinear":
            self.quant[node.output[0]] = _Quant(node.input[1], node.input[2] if len(node.input) > 2 else "")
        if node.op_type in FORMS:
            self._expand(node, FORMS[node.op_type])
        elif node.op_type == "QLinearConcat":
            self._concat(node)
        elif node.op_type in DATA_MOVEMENT and node.input[0] in self.quant:
            self._around(node)
        else:
            self.nodes.append(node)

    def _dequantize(self, node: onnx.NodeProto, tensor: str, scale: str, zero_point: str, axis: int | None = None) -> str:
        output = f"{tensor}__dq_{len(self.nodes)}"
        inputs = [tensor, scale] + ([zero_point] if zero_point else [])
        extra = {"axis": axis} if axis is not None else {}
        self.nodes.append(helper.make_node("DequantizeLinear", inputs, [output], name=f"{node.name}__dq_{len(self.nodes)}", **extra))
        return output

    def _quantize(self, node: onnx.NodeProto, value: str, output: str, quant: _Quant) -> None:
        inputs = [value, quant.scale] + ([quant.zero_point] if quant.zero_point else [])
        self.nodes.append(helper.make_node("QuantizeLinear", inputs, [output], name=f"{node.name}__q"))
        self.quant[output] = quant

    def _attributes(self, node: onnx.NodeProto) -> dict:
        """The node's attributes but ``channels_last`` (contrib ops' own, refused when set)."""
        return {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "channels_last"}

    def _expand(self, node: onnx.NodeProto, form: _Form) -> None:
        inputs = list(node.input)
        if node.op_type == "QLinearGlobalAveragePool" and _attribute(node, "channels_last", 0):
            raise self._error(node, "channels_last=1 is not supported; export the model in NCHW")
        if node.op_type == "QGemm" and (len(inputs) <= form.output[0] or not inputs[form.output[0]]):
            raise self._error(node, "a QGemm without an output scale (float output) is not supported")
        if node.op_type == "QGemm" and _attribute(node, "alpha", 1.0) != 1.0:
            raise self._error(node, "alpha other than 1 is not supported")
        floats = []
        for index, (tensor, scale, zero) in enumerate(form.inputs):
            per_channel = form.weighted and index == 1 and self.constants.get(inputs[scale], np.zeros(1)).size > 1
            axis = _weight_axis(node) if per_channel else None
            floats.append(self._dequantize(node, inputs[tensor], inputs[scale], _optional(inputs, zero), axis))
        if _optional(inputs, form.bias):
            floats.append(self._bias(node, inputs, form))
        value = f"{node.output[0]}__float"
        self.nodes.append(helper.make_node(form.op_type, floats, [value], name=node.name, **self._attributes(node)))
        scale, zero = form.output
        self._quantize(node, value, node.output[0], _Quant(inputs[scale], _optional(inputs, zero)))

    def _bias(self, node: onnx.NodeProto, inputs: list[str], form: _Form) -> str:
        """The int32 bias dequantized at ``float32(s_in * s_w)`` (zero point 0), as a QDQ file holds it."""
        source_scale = self.constants.get(inputs[form.inputs[0][1]])
        weight_scale = self.constants.get(inputs[form.inputs[1][1]])
        if source_scale is None or weight_scale is None:
            raise self._error(node, "scales must be constants")
        scales = (source_scale.astype(np.float64) * weight_scale.astype(np.float64)).astype(np.float32).reshape(-1)
        suffix = len(self.nodes)
        scale_name, bias = f"{inputs[form.bias]}__scale_{suffix}", inputs[form.bias]
        self.graph.initializer.append(numpy_helper.from_array(scales if scales.size > 1 else scales.reshape(()), scale_name))
        if bias in self.dequantized_biases and bias in self.constants:  # shared by layers at other scales: a copy each
            bias = f"{bias}__copy_{suffix}"
            self.graph.initializer.append(numpy_helper.from_array(self.constants[inputs[form.bias]], bias))
        self.dequantized_biases.add(bias)
        return self._dequantize(node, bias, scale_name, "", 0 if scales.size > 1 else None)

    def _concat(self, node: onnx.NodeProto) -> None:
        inputs = list(node.input)
        floats = [self._dequantize(node, *inputs[i : i + 3]) for i in range(2, len(inputs), 3)]
        value = f"{node.output[0]}__float"
        self.nodes.append(helper.make_node("Concat", floats, [value], name=node.name, axis=_attribute(node, "axis", 0)))
        self._quantize(node, value, node.output[0], _Quant(inputs[0], inputs[1]))

    def _around(self, node: onnx.NodeProto) -> None:
        """A data-movement op on integers: DequantizeLinear, the op, QuantizeLinear at the same parameters."""
        quant = self.quant[node.input[0]]
        rest = list(node.input[1:])
        value = f"{node.output[0]}__float"
        self.nodes.append(
            helper.make_node(node.op_type, [self._dequantize(node, node.input[0], quant.scale, quant.zero_point), *rest], [value], name=node.name,
                             **self._attributes(node))
        )
        self._quantize(node, value, node.output[0], quant)


def _optional(inputs: list[str], index: int | None) -> str:
    """The name of an optional input ("" when absent)."""
    return inputs[index] if index is not None and index < len(inputs) else ""


def _weight_axis(node: onnx.NodeProto) -> int:
    """The output-channel axis of a weighted node's weights: 0 for QLinearConv (OIHW) and a transposed QGemm."""
    return 0 if node.op_type == "QLinearConv" or _attribute(node, "transB", 0) else 1


def _attribute(node: onnx.NodeProto, name: str, default: object) -> object:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)

