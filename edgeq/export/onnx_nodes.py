"""What edgeq reads from an ONNX node: its name, attributes and op, the constants of a graph, the quantize nodes
around a tensor."""

from __future__ import annotations

from collections.abc import Callable, Container, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edgeq.ops import Op, gated_op, op_of_onnx_type

QUANTIZE_NODES = ("QuantizeLinear", "DequantizeLinear")
"""The node types that only change a tensor's representation, not its values."""

QDQ_NODES = (*QUANTIZE_NODES, "Constant")
"""Node types that carry quantization (or constants) rather than compute: every other node is (part of) an op."""


def unquantized(tensor: str, producer: Mapping[str, onnx.NodeProto]) -> str:
    """The tensor that ``tensor`` is a (de)quantized form of, through any chain of QuantizeLinear and
    DequantizeLinear nodes (``tensor`` itself when no such node makes it)."""
    while tensor in producer and producer[tensor].op_type in QUANTIZE_NODES:
        tensor = producer[tensor].input[0]
    return tensor


def node_op(node: onnx.NodeProto, is_weight: Callable[[str], bool] | None = None) -> Op | None:
    """The op an ONNX node reads as: by its type (:func:`edgeq.ops.op_of_onnx_type`), a ``Resize`` by its ``mode``
    (``linear`` is ``upsample_bilinear2d``), a ``Gelu`` by its
    ``approximate`` (ONNX's own, opset 20: ``'tanh'`` is ``gelu_tanh``), a ``MatMul`` by its second input (a weight
    makes it ``linear``, an activation ``matmul``; ``is_weight`` says which tensors are weights, see
    :func:`is_weight_tensor`: without it a MatMul reads as ``linear``); ``None`` for a type edgeq has no integer op
    for and for a ``FastGelu`` with a bias input (``gelu_tanh(x + bias)`` is not a function of one tensor)."""
    op = op_of_onnx_type(node.op_type)
    if node.op_type == "MatMul" and is_weight is not None and len(node.input) > 1 and not is_weight(node.input[1]):
        return Op.MATMUL
    if op is Op.UPSAMPLE_NEAREST2D and attribute_text(node_attributes(node), "mode", "nearest") == "linear":
        return Op.UPSAMPLE_BILINEAR2D
    if op is Op.GELU and attribute_text(node_attributes(node), "approximate", "none") == "tanh":
        return Op.GELU_TANH
    if op is Op.GELU_TANH and len(node.input) > 1 and node.input[1]:
        return None
    return op


def is_weight_tensor(tensor: str, constants: Container[str], producer: Mapping[str, onnx.NodeProto]) -> bool:
    """Whether ``tensor`` is a constant or the DequantizeLinear of one (a weight or bias), not an activation."""
    if tensor in constants:
        return True
    node = producer.get(tensor)
    return node is not None and node.op_type == "DequantizeLinear" and node.input[0] in constants


def gated_activation(node: onnx.NodeProto, producer: dict[str, onnx.NodeProto]) -> onnx.NodeProto | None:
    """The activation ``g`` when ``node`` is ``Mul(x, g(x))`` for a ``g`` that has a gated form (``x * sigmoid(x)``
    is SiLU, ``x * hardsigmoid(x)`` Hardswish); None otherwise."""
    if node.op_type != "Mul" or len(node.input) != 2:
        return None
    for source, other in (node.input, node.input[::-1]):
        gate = producer.get(other)
        op = op_of_onnx_type(gate.op_type) if gate is not None else None
        if op is not None and gated_op(op) is not None and list(gate.input) == [source]:
            return gate
    return None


def node_name(node: onnx.NodeProto) -> str:
    """A node's name, or its first output's when it has none."""
    return node.name or node.output[0]


def node_attributes(node: onnx.NodeProto) -> dict[str, Any]:
    """A node's attributes by name, as Python values (a tensor attribute as its ``TensorProto``)."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def attribute_text(attributes: Mapping[str, Any], name: str, default: str) -> str:
    """A string attribute of :func:`node_attributes` as text (ONNX stores them as bytes), ``default`` when absent."""
    value = attributes.get(name)
    return default if value is None else value.decode() if isinstance(value, bytes) else str(value)


_NUMBER_CONSTANTS = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64}
"""The attributes besides ``value`` in which a Constant node gives numbers, and the numbers' dtype."""


def with_tensor_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every Constant node that gives numbers in ``value_float(s)`` / ``value_int(s)`` written in the
    ``value`` form (a tensor), the one TVM's ONNX importer and :func:`graph_constants` read; ``model`` itself when
    it has none."""
    numbers = [i for i, n in enumerate(model.graph.node) if n.op_type == "Constant" and n.attribute[0].name in _NUMBER_CONSTANTS]
    if not numbers:
        return model
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    for index in numbers:
        node = rewritten.graph.node[index]
        (attribute,) = node.attribute  # a Constant has exactly one
        values = np.asarray(onnx.helper.get_attribute_value(attribute), dtype=_NUMBER_CONSTANTS[attribute.name])
        del node.attribute[:]
        node.attribute.append(onnx.helper.make_attribute("value", numpy_helper.from_array(values)))
    return rewritten


def graph_constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """The value of every constant tensor of ``graph``: its initializers and the outputs of its Constant nodes
    that hold a tensor (:func:`with_tensor_constants` gives numbers that form)."""
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        attributes = node_attributes(node) if node.op_type == "Constant" else {}
        if "value" in attributes:
            constants[node.output[0]] = numpy_helper.to_array(attributes["value"])
    return constants


def resize_follows_sizes(node: onnx.NodeProto, constants: dict[str, np.ndarray], source: Sequence[int], target: Sequence[int]) -> bool:
    """Whether a ``Resize`` from shape ``source`` to ``target`` samples at the coordinates of the sizes' ratio
    (``out / in`` per axis), as TVM's importer computes every Resize: true for one given ``sizes``, or ``scales``
    equal to that ratio; false for ``scales`` that differ (torch's ``interpolate(scale_factor=1.5)`` of 7 columns
    writes 10 columns sampled at ``x / 1.5``, not at ``x * 7 / 10``), or that are not constants."""
    if len(node.input) < 3 or not node.input[2]:
        return True
    scales = constants.get(node.input[2])
    if scales is None:
        return False
    if scales.size == 0:
        return True
    ratios = np.asarray(target, dtype=np.float64) / np.asarray(source, dtype=np.float64)
    return scales.shape == ratios.shape and bool(np.allclose(scales, ratios, rtol=1e-6, atol=0))
