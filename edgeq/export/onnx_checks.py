"""Checks of an ONNX graph before and after the ONNX checker: what no compiled program can have, refused with the
file and the input, output, node or tensor named (:func:`edgeq.export.onnx_reader.read_qdq` runs them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from edgeq.errors import ModelFileError
from edgeq.export.onnx_nodes import QDQ_NODES, node_name, unquantized


def check_interface(graph: onnx.GraphProto, path: Path) -> None:
    """Refuse, before the ONNX checker (whose shape inference and SSA check report these less clearly), a graph
    without inputs (other than initializers), outputs or nodes, with an input dimension below 1, or with a tensor
    that two nodes write.

    Raises:
        ModelFileError: naming the file and the input, or the tensor and its two nodes.
    """
    _check_inputs_outputs_nodes(graph, path)
    _check_single_writers(graph, path)


def check_graph(graph: onnx.GraphProto, path: Path) -> None:
    """Refuse what the ONNX checker accepts but no compiled program can have: an output no op computes, two ops of
    one name, or an integer constant outside its type.

    Raises:
        ModelFileError: naming the file and the output, node or tensor.
    """
    _check_outputs_computed(graph, path)
    _check_node_names(graph, path)
    for tensor in _stored_tensors(graph):
        _check_stored_integers(tensor, path)


def _check_inputs_outputs_nodes(graph: onnx.GraphProto, path: Path) -> None:
    """The graph has inputs (other than initializers), outputs and nodes, and no input dimension below 1."""
    initializers = {init.name for init in graph.initializer}
    inputs = [info for info in graph.input if info.name not in initializers]
    for present, what, why in (
        (inputs, "inputs", "a compiled model reads at least one tensor"),
        (graph.output, "outputs", "a compiled model returns at least one tensor"),
        (graph.node, "nodes", "nothing to compute"),
    ):
        if not present:
            raise ModelFileError(f"{path}: the graph has no {what} ({why}); export the model with its {what}")
    for info in inputs:
        dims = info.type.tensor_type.shape.dim
        for axis, dim in enumerate(dims):
            if dim.HasField("dim_value") and dim.dim_value < 1:
                shape = [d.dim_value if d.HasField("dim_value") else d.dim_param or "?" for d in dims]
                raise ModelFileError(
                    f"{path}: input '{info.name}': dimension {axis} is {dim.dim_value} (shape {shape}); sizes must be "
                    "at least 1 (a dynamic dimension is named, and compile takes its size from --input-shape)"
                )


def _check_single_writers(graph: onnx.GraphProto, path: Path) -> None:
    """No two nodes write one tensor (the ONNX checker says so without naming the nodes)."""
    writers: dict[str, onnx.NodeProto] = {}
    for node in graph.node:
        for tensor in filter(None, node.output):
            first = writers.setdefault(tensor, node)
            if first is not node:
                raise ModelFileError(
                    f"{path}: tensor '{tensor}' is written by two nodes, {first.op_type} '{node_name(first)}' and "
                    f"{node.op_type} '{node_name(node)}'; give each node's output its own name"
                )


def _check_outputs_computed(graph: onnx.GraphProto, path: Path) -> None:
    """Every output comes from a compute node or a quantization of an input, not straight from an input or from a
    constant."""
    producer = {out: node for node in graph.node for out in node.output}
    initializers = {init.name for init in graph.initializer}
    inputs = {i.name for i in graph.input}
    for output in graph.output:
        tensor = unquantized(output.name, producer)
        node = producer.get(tensor)
        if (node is not None and node.op_type != "Constant") or (tensor in inputs and tensor != output.name):
            continue
        origin = "a constant" if node is not None or tensor in initializers else "an input"
        raise ModelFileError(
            f"{path}: output '{output.name}' is {origin} ('{tensor}'), which no op computes; "
            "the compiled program's outputs must be computed by its ops"
        )


def _check_node_names(graph: onnx.GraphProto, path: Path) -> None:
    """Every compute node (the ops: reports, placements and regions name them) has its own :func:`node_name` (a
    node without a name is named after its first output)."""
    types_by_name: dict[str, list[str]] = {}
    for node in graph.node:
        if node.op_type not in QDQ_NODES:
            types_by_name.setdefault(node_name(node), []).append(node.op_type)
    for name, types in types_by_name.items():
        if len(types) > 1:
            raise ModelFileError(
                f"{path}: {len(types)} nodes are named '{name}' ({', '.join(types)}); give each node its own name "
                "(a node without a name is named after its first output)"
            )


def _stored_tensors(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    """The tensors a graph stores: its initializers and the values of its Constant nodes."""
    values = [a.t for node in graph.node if node.op_type == "Constant" for a in node.attribute if a.name == "value"]
    return [*graph.initializer, *values]


_NARROW_INTEGERS = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16)
"""Integer types that ONNX stores in the wider ``int32_data`` field (when not in ``raw_data``), which can hold
values outside the type: ``numpy_helper.to_array`` would wrap them (1000 as int8 is -24)."""


def _check_stored_integers(tensor: onnx.TensorProto, path: Path) -> None:
    """A narrow integer tensor stored in ``int32_data`` holds only values of its type."""
    if tensor.data_type not in _NARROW_INTEGERS or not tensor.int32_data:
        return
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    limits = np.iinfo(dtype)
    values = np.asarray(tensor.int32_data, dtype=np.int64)
    outside = values[(values < limits.min) | (values > limits.max)]
    if outside.size:
        value = int(outside[0])
        raise ModelFileError(
            f"{path}: tensor '{tensor.name}' is {dtype.name} but holds {value} (allowed: {limits.min}..{limits.max}), "
            f"which readers wrap to {int(np.array(value).astype(dtype))}; write it with values of its type"
        )
