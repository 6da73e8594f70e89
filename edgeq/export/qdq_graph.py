"""Lookups over a QDQ model, shared by the check (records) and the compiler (partition)."""

from __future__ import annotations

import onnx

from edgeq.export.onnx_nodes import QDQ_NODES, gated_activation, is_weight_tensor, node_name, node_op
from edgeq.export.onnx_reader import QDQModel, QuantParams
from edgeq.ops import Op


def inferred_shapes(graph: onnx.GraphProto) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of a shape-inferred ``graph`` that has one (-1 for a dynamic dimension)."""
    return {
        info.name: tuple(d.dim_value if d.HasField("dim_value") else -1 for d in info.type.tensor_type.shape.dim)
        for info in [*graph.input, *graph.value_info, *graph.output]
        if info.type.tensor_type.HasField("shape")  # no shape at all: even the rank is unknown
    }


def static_shape(shapes: dict[str, tuple[int, ...]], tensor: str) -> tuple[int, ...] | None:
    """``tensor``'s shape in ``shapes`` when every dimension is known."""
    shape = shapes.get(tensor)
    return shape if shape is not None and all(d > 0 for d in shape) else None


class QDQGraph:
    """A QDQ model with inferred shapes: which node makes and which nodes read each tensor, the constants, the
    shapes, the quantized tensor behind each DequantizeLinear, and the ops.

    Attributes:
        ops: the compute nodes that are ops of their own, in graph order: a linear layer over more than two axes
            is a MatMul and the Add of its bias, one op named after the MatMul.
        bias_adds: MatMul name -> the Add of its bias.
        fused_into: name of a bias Add or a gating Mul -> the name of the MatMul or activation whose op it is part of.
        shapes: every tensor's shape as far as inference knows it (-1 for a dynamic dimension).
    """

    def __init__(self, qdq: QDQModel) -> None:
        self.qdq = qdq
        self.model = onnx.shape_inference.infer_shapes(qdq.model)
        graph = self.model.graph
        self.nodes = list(graph.node)
        self.inputs = {info.name for info in graph.input}
        self.producer = {out: node for node in self.nodes for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.constants = qdq.constants
        self.shapes = inferred_shapes(graph)
        self.shapes.update({name: value.shape for name, value in self.constants.items()})
        compute_nodes = [n for n in self.nodes if n.op_type not in QDQ_NODES]
        self.bias_adds = {
            node_name(n): add for n in compute_nodes if n.op_type == "MatMul" and (add := self._bias_add(n)) is not None
        }
        self.gate_muls = {
            node_name(gate): mul for mul in compute_nodes if (gate := gated_activation(mul, self.producer)) is not None
        }
        """A gated activation's ``g`` node -> its ``Mul(x, g(x))`` (one op: SiLU, Hardswish)."""
        self.followers = {**self.bias_adds, **self.gate_muls}
        self.fused_into = {node_name(follower): op for op, follower in self.followers.items()}
        self.ops = [n for n in compute_nodes if node_name(n) not in self.fused_into]

    def _bias_add(self, matmul: onnx.NodeProto) -> onnx.NodeProto | None:
        """The Add of a dequantized constant bias right after a MatMul of a weight (a linear layer)."""
        if self.op_of(matmul) is not Op.LINEAR:
            return None
        consumers = self.consumers.get(matmul.output[0], [])
        if len(consumers) != 1 or consumers[0].op_type != "Add":
            return None
        add = consumers[0]
        other = [t for t in add.input if t != matmul.output[0]]
        dequantized = self.dequantized(other[0]) if len(other) == 1 else None
        return add if dequantized is not None and dequantized[0] in self.constants else None

    def op_name(self, node: onnx.NodeProto) -> str:
        """The name of the op a compute node is (part of)."""
        return self.fused_into.get(node_name(node), node_name(node))

    def members(self, op: onnx.NodeProto) -> list[onnx.NodeProto]:
        """The nodes of an op: the node itself, and a MatMul's bias Add or a gated activation's Mul."""
        follower = self.followers.get(node_name(op))
        return [op] if follower is None else [op, follower]

    def op_output(self, op: onnx.NodeProto) -> str:
        """The tensor that leaves an op (after a MatMul's bias Add)."""
        return self.members(op)[-1].output[0]

    def static_shape(self, tensor: str) -> tuple[int, ...] | None:
        """The tensor's shape when every dimension is known."""
        return static_shape(self.shapes, tensor)

    def dequantized(self, tensor: str) -> tuple[str, QuantParams] | None:
        """(quantized tensor, its parameters) when ``tensor`` is the output of a DequantizeLinear."""
        node = self.producer.get(tensor)
        if node is None or node.op_type != "DequantizeLinear":
            return None
        return node.input[0], self.qdq.quant[node.input[0]]

    def is_weight(self, tensor: str) -> bool:
        """Whether ``tensor`` is a constant or a dequantized constant (a weight or bias)."""
        return is_weight_tensor(tensor, self.constants, self.producer)

    def op_of(self, node: onnx.NodeProto) -> Op | None:
        """The op a compute node reads as (:func:`~edgeq.export.onnx_nodes.node_op`, with this graph's weights)."""
        return node_op(node, self.is_weight)

    def activation_inputs(self, node: onnx.NodeProto) -> list[str]:
        """The tensors ``node`` reads that are neither constants nor dequantized constants (weights, biases)."""
        return [tensor for tensor in node.input if tensor and not self.is_weight(tensor)]

    def quantized_inputs(self, node: onnx.NodeProto) -> list[str]:
        """The quantized tensors an op computes on, in input order: its activation inputs and, for an op without
        weights, the dequantized constants it reads (ViT's class token concatenated to the patches)."""
        op = self.op_of(node)
        weighted = op is not None and op.info.weighted
        return [
            tensor for tensor in node.input
            if tensor and (not self.is_weight(tensor) or (not weighted and self.dequantized(tensor) is not None))
        ]
