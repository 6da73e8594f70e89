"""Resizes by a scale whose coordinates TVM would take from the sizes, rewritten as matrix products ONNX's way.

TVM's ONNX importer turns a ``Resize``'s ``scales`` into output sizes and samples at the coordinates of the
sizes' ratio; ONNX (and torch, resizing by ``scale_factor``) samples at those of the scale. They differ when
``in * scale`` is not whole: ``interpolate(scale_factor=1.5)`` of 7 columns gives 10 columns sampled at
``(x + 0.5) / 1.5 - 0.5``, not at ``(x + 0.5) * 0.7 - 0.5``. The check sends such a Resize to the CPU in float
(:func:`edgeq.export.onnx_reader.resize_follows_sizes`), and before TVM imports the region each one becomes, per
resized axis, a ``MatMul`` by a constant interpolation matrix (one 1 per row for ``nearest``, the two neighbours'
weights for ``linear``) built with the coordinate formulas of the ONNX specification.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeq.errors import CompileError
from edgeq.export.onnx_reader import node_attributes, node_name, resize_follows_sizes

_NEAREST = {
    "round_prefer_floor": lambda x: np.ceil(x - 0.5),
    "round_prefer_ceil": lambda x: np.floor(x + 0.5),
    "floor": np.floor,
    "ceil": np.ceil,
}
"""ONNX ``nearest_mode``: the source index of a source coordinate."""


def _text(value: object, default: str) -> str:
    return value.decode() if isinstance(value, bytes) else default if value is None else str(value)


def source_coordinates(mode: str, in_size: int, out_size: int, scale: float) -> np.ndarray:
    """The source coordinate of each output index along one axis (ONNX ``coordinate_transformation_mode``).

    Raises:
        ValueError: a mode this rewrite does not compute (``tf_crop_and_resize`` needs a region of interest).
    """
    x = np.arange(out_size, dtype=np.float64)
    if mode == "half_pixel":
        return (x + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (x + 0.5) / scale - 0.5 if out_size > 1 else np.zeros(1)
    if mode == "align_corners":
        return x * (in_size - 1) / (out_size - 1) if out_size > 1 else np.zeros(1)
    if mode == "asymmetric":
        return x / scale
    if mode == "tf_half_pixel_for_nn":
        return (x + 0.5) / scale
    raise ValueError(f"coordinate_transformation_mode '{mode}'")


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
    mode = _text(attributes.get("mode"), "nearest")
    coordinate_mode = _text(attributes.get("coordinate_transformation_mode"), "half_pixel")
    nearest_mode = _text(attributes.get("nearest_mode"), "round_prefer_floor")
    unsupported = [
        what
        for what, bad in (
            (f"mode '{mode}'", mode not in ("nearest", "linear")),
            (f"coordinate_transformation_mode '{coordinate_mode}'", coordinate_mode == "tf_crop_and_resize"),
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


def _static_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for info in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = info.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[info.name] = [d.dim_value for d in dims]
    return shapes


def with_resize_coordinates_of_onnx(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` (a region's graph) in which every Resize by scales whose coordinates differ from its
    sizes' ratio is matrix products computing ONNX's coordinates (module doc); ``model`` itself when it has none.

    Raises:
        CompileError: such a Resize with settings this rewrite does not compute (the message names it).
    """
    resizes = [n for n in model.graph.node if n.op_type == "Resize"]
    if not resizes:
        return model
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    constants.update({n.output[0]: numpy_helper.to_array(node_attributes(n)["value"]) for n in model.graph.node if n.op_type == "Constant" and "value" in node_attributes(n)})
    shapes = _static_shapes(model)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    nodes: list[onnx.NodeProto] = []
    changed = False
    for node in rewritten.graph.node:
        source, target = shapes.get(node.input[0]) if node.input else None, shapes.get(node.output[0])
        if node.op_type != "Resize" or source is None or target is None or resize_follows_sizes(node, constants, source, target):
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
