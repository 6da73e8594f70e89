"""Lookups over a QDQ model, shared by the check (records) and the compiler (partition)."""

from __future__ import annotations

import onnx

from edgeq.export.onnx_reader import QDQModel, QuantParams

QDQ_NODES = ("QuantizeLinear", "DequantizeLinear", "Constant")
"""Node types that carry quantization (or constants) rather than compute."""


class QDQGraph:
    """A QDQ model with inferred shapes: which node makes and which nodes read each tensor, the constants, the
    shapes, and the quantized tensor behind each DequantizeLinear.

    Attributes:
        shapes: every tensor's shape as far as inference knows it (-1 for a dynamic dimension).
    """

    def __init__(self, qdq: QDQModel) -> None:
        self.qdq = qdq
        self.model = onnx.shape_inference.infer_shapes(qdq.model)
        graph = self.model.graph
        self.nodes = list(graph.node)
        self.compute_nodes = [n for n in self.nodes if n.op_type not in QDQ_NODES]
        self.inputs = {info.name for info in graph.input}
        self.producer = {out: node for node in self.nodes for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.constants = qdq.constants
        self.shapes: dict[str, tuple[int, ...]] = {
            info.name: tuple(d.dim_value if d.HasField("dim_value") else -1 for d in info.type.tensor_type.shape.dim)
            for info in [*graph.input, *graph.value_info, *graph.output]
        }
        self.shapes.update({name: value.shape for name, value in self.constants.items()})

    def static_shape(self, tensor: str) -> tuple[int, ...] | None:
        """The tensor's shape when every dimension is known."""
        shape = self.shapes.get(tensor)
        return shape if shape is not None and all(d > 0 for d in shape) else None

    def dequantized(self, tensor: str) -> tuple[str, QuantParams] | None:
        """(quantized tensor, its parameters) when ``tensor`` is the output of a DequantizeLinear."""
        node = self.producer.get(tensor)
        if node is None or node.op_type != "DequantizeLinear":
            return None
        return node.input[0], self.qdq.quant[node.input[0]]

    def activation_inputs(self, node: onnx.NodeProto) -> list[str]:
        """The tensors ``node`` reads that are neither constants nor dequantized constants (weights, biases)."""
        names = []
        for tensor in node.input:
            if not tensor or tensor in self.constants:
                continue
            dequantized = self.dequantized(tensor)
            if dequantized is not None and dequantized[0] in self.constants:
                continue
            names.append(tensor)
        return names
