"""Resizes by a scale whose coordinates TVM would take from the sizes, rewritten as matrix products ONNX's way.

TVM's ONNX importer turns a ``Resize``'s ``scales`` into output sizes and samples at the coordinates of the
sizes' ratio; ONNX (and torch, resizing by ``scale_factor``) samples at those of the scale. They differ when
``in * scale`` is not whole: ``interpolate(scale_factor=1.5)`` of 7 columns gives 10 columns sampled at
``(x + 0.5) / 1.5 - 0.5``, not at ``(x + 0.5) * 0.7 - 0.5``. The check sends such a Resize to the CPU in float
(:func:`edgeq.export.onnx_nodes.resize_follows_sizes`), and before TVM imports the region each one becomes, per
resized axis, a ``MatMul`` by a constant interpolation matrix (one 1 per row for ``nearest``, the two neighbours'
weights for ``linear``) built with the coordinate formulas of the ONNX specification.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeq.errors import CompileError
from edgeq.export.onnx_nodes import attribute_text, graph_constants, node_attributes, node_name, resize_follows_sizes
from edgeq.export.qdq_graph import inferred_shapes, static_shape

_NEAREST = {
    "round_prefer_floor": lambda x: np.ceil(x - 0.5),
    "round_prefer_ceil": lambda x: np.floor(x + 0.5),
    "floor": np.floor,
    "ceil": np.ceil,
}
"""ONNX ``nearest_mode``: the source index of a source coordinate."""

_COORDINATES = {
    "half_pixel": lambda x, in_size, out_size, scale: (x + 0.5) / scale - 0.5,
    "pytorch_half_pixel": lambda x, in_size, out_size, scale: (x + 0.5) / scale - 0.5 if out_size > 1 else 0 * x,
    "align_corners": lambda x, in_size, out_size, scale: x * (in_size - 1) / (out_size - 1) if out_size > 1 else 0 * x,
    "asymmetric": lambda x, in_size, out_size, scale: x / scale,
    "tf_half_pixel_for_nn": lambda x, in_size, out_size, scale: (x + 0.5) / scale,
}
"""ONNX ``coordinate_transformation_mode``: the source coordinate of output indices ``x`` along one axis
(``tf_crop_and_resize`` is not here: it needs a region of interest)."""


def source_coordinates(mode: str, in_size: int, out_size: int, scale: float) -> np.ndarray:
    """The source coordinate of each output index along one axis (:data:`_COORDINATES`)."""
    return _COORDINATES[mode](np.arange(out_size, dtype=np.float64), in_size, out_size, scale)


def interpolation_matrix(mode: str, nearest_mode: str, in_size: int, coordinates: np.ndarray) -> np.ndarray:
    """The ``(out, in)`` float32 matrix that resizes one axis sampling at ``coordinates``: one 1 per row
    (``nearest``), or the two weights of the neighbours (``linear``, coordinates clamped to the input as ONNX
    clamps them)."""
    rows = np.arange(len(coordinates))
    matrix = np.zeros((len(coordinates), in_size), dtype=np.float64)
    if mode == "nearest":
        matrix[rows, np.clip(_NEAREST[nearest_mode](coordinates), 0, in_size - 1).astype(np.int64)] = 1
        return matrix.astype(np.float32)
    clamped = np.clip(coordinates, 0, in_size - 1)
    low = np.floor(clamped).astype(np.int64)
    high = np.minimum(low + 1, in_size - 1)
    np.add.at(matrix, (rows, low), 1 - (clamped - low))
    np.add.at(matrix, (rows, high), clamped - low)
    return matrix.astype(np.float32)


def _replacement(node: onnx.NodeProto, graph: onnx.GraphProto, source: list[int], target: list[int], scales: np.ndarray) -> list[onnx.NodeProto]:
    attributes = node_attributes(node)
    mode = attribute_text(attributes, "mode", "nearest")
    coordinate_mode = attribute_text(attributes, "coordinate_transformation_mode", "half_pixel")
    nearest_mode = attribute_text(attributes, "nearest_mode", "round_prefer_floor")
    unsupported = [
        what
        for what, bad in (
            (f"mode '{mode}'", mode not in ("nearest", "linear")),
            (f"coordinate_transformation_mode '{coordinate_mode}'", coordinate_mode not in _COORDINATES),
            ("antialias", bool(attributes.get("antialias", 0))),
            ("axes", "axes" in attributes),
            (f"nearest_mode '{nearest_mode}'", mode == "nearest" and nearest_mode not in _NEAREST),
        )
        if bad
    ]
    if unsupported:
        raise CompileError(
            f"Resize '{node_name(node)}': resizing by scales {scales.tolist()} to sizes that are not the input's times "
            f"them, with {', '.join(unsupported)}, is not supported (TVM would sample at other coordinates); resize to "
            "an output size instead"
        )
    nodes, value, rank = [], node.input[0], len(source)
    for axis, (in_size, out_size, scale) in enumerate(zip(source, target, scales)):
        if in_size == out_size and scale == 1:
            continue
        if axis < rank - 2:
            raise CompileError(f"Resize '{node_name(node)}': resizing axis {axis} by a scale is not supported (only the last two)")
        coordinates = source_coordinates(coordinate_mode, in_size, out_size, float(scale))
        matrix = interpolation_matrix(mode, nearest_mode, in_size, coordinates)
        name = f"{node_name(node)}__axis{axis}"
        graph.initializer.append(numpy_helper.from_array(matrix if axis == rank - 2 else matrix.T.copy(), f"{name}_matrix"))
        operands = [f"{name}_matrix", value] if axis == rank - 2 else [value, f"{name}_matrix"]
        nodes.append(helper.make_node("MatMul", operands, [name]))
        value = name
    nodes.append(helper.make_node("Identity", [value], list(node.output)))
    return nodes


def with_resize_coordinates_of_onnx(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` (a region's graph) in which every Resize by scales whose coordinates differ from its
    sizes' ratio is matrix products computing ONNX's coordinates (module doc); ``model`` itself when it has none.

    Raises:
        CompileError: such a Resize with settings this rewrite does not compute (the message names it).
    """
    if not any(n.op_type == "Resize" for n in model.graph.node):
        return model
    constants = graph_constants(model.graph)
    shapes = inferred_shapes(onnx.shape_inference.infer_shapes(model).graph)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    nodes: list[onnx.NodeProto] = []
    changed = False
    for node in rewritten.graph.node:
        source, target = (static_shape(shapes, node.input[0]), static_shape(shapes, node.output[0])) if node.op_type == "Resize" else (None, None)
        if source is None or target is None or resize_follows_sizes(node, constants, source, target):
            nodes.append(node)
            continue
        scales = constants.get(node.input[2])
        if scales is None or math.prod(scales.shape) != len(source):
            raise CompileError(f"Resize '{node_name(node)}': its scales are not a constant of one value per axis; resize to an output size instead")
        nodes += _replacement(node, rewritten.graph, source, target, scales)
        changed = True
    if not changed:
        return model
    del rewritten.graph.node[:]
    rewritten.graph.node.extend(nodes)
    return rewritten
