"""TOSA forms of the ops that only move int8 values: reshape (RESHAPE, in the logical order), transpose (nothing:
the value's layout changes), slice and split (SLICE in the value's own layout), pad with zeros (PAD), nearest
upsampling (RESIZE) and max pooling (MAX_POOL2D)."""

from __future__ import annotations

import numpy as np
import tosa_serializer as ts

from edgeq.export.onnx_nodes import attribute_text
from edgeq.export.tosa.builder import NHWC, TosaBuilder, TosaValue, attribute
from edgeq.export.tosa.forms.unit import TOSA_FORMS, OpUnit
from edgeq.export.tosa.forms.windows import window_input
from edgeq.ops import Op


@TOSA_FORMS.register(Op.RESHAPE)
def _reshape(builder: TosaBuilder, unit: OpUnit) -> list[TosaValue]:
    """RESHAPE of the values in logical order (a TRANSPOSE first when the layout holds them otherwise, as before a
    linear layer reading a flattened image)."""
    return [builder.reshape(unit.inputs[0], unit.output_shape(), unit.outputs[0])]


@TOSA_FORMS.register(Op.TRANSPOSE)
def _transpose(builder: TosaBuilder, unit: OpUnit) -> list[TosaValue]:
    """No operator: the same TOSA tensor, read in the permuted logical order."""
    source = unit.inputs[0]
    rank = len(source.shape)
    order = [int(a) for a in unit.attributes.get("perm", range(rank - 1, -1, -1))]
    perm = tuple(order.index(axis) for axis in source.perm)
    return [TosaValue(source.name, tuple(source.shape[a] for a in order), source.dtype, perm)]


@TOSA_FORMS.register(Op.SLICE)
def _slice(builder: TosaBuilder, unit: OpUnit) -> list[TosaValue]:
    """SLICE of the block the ONNX Slice reads (steps of 1)."""
    source = unit.inputs[0]
    starts_in, ends_in = (unit.constant(t).tolist() for t in unit.node.input[1:3])
    rank = len(source.shape)
    axes = unit.constant(unit.node.input[3]).tolist() if len(unit.node.input) > 3 and unit.node.input[3] else list(range(len(starts_in)))
    steps = unit.constant(unit.node.input[4]).tolist() if len(unit.node.input) > 4 and unit.node.input[4] else [1] * len(axes)
    if any(step != 1 for step in steps):
        raise unit.refuse(f"a slice with steps {steps} has no TOSA form (allowed: 1)")
    starts, sizes = [0] * rank, list(source.shape)
    for axis, start, end in zip(axes, starts_in, ends_in):
        axis, size = axis % rank, source.shape[axis % rank]
        start = min(max(start + size if start < 0 else start, 0), size)
        end = min(max(end + size if end < 0 else end, 0), size)
        starts[axis], sizes[axis] = start, max(end - start, 0)
    return [builder.slice(source, starts, sizes, unit.outputs[0])]


@TOSA_FORMS.register(Op.SPLIT)
def _split(builder: TosaBuilder, unit: OpUnit) -> list[TosaValue]:
    """One SLICE per part."""
    source = unit.inputs[0]
    axis = int(unit.attributes.get("axis", 0)) % len(source.shape)
    results, start = [], 0
    for index, name in enumerate(unit.outputs):
        size = unit.output_shape(index)[axis]
        starts, sizes = [0] * len(source.shape), list(source.shape)
        starts[axis], sizes[axis] = start, size
        results.append(builder.slice(source, starts, sizes, name))
        start += size
    return results


@TOSA_FORMS.register(Op.PAD)
def _pad(builder: TosaBuilder, unit: OpUnit) -> list[TosaValue]:
    """PAD with the zero point, 0, of the widths the ONNX Pad reads, in the value's own layout."""
    source = unit.inputs[0]
    rank = len(source.shape)
    inputs = unit.node.input
    if len(inputs) > 2 and inputs[2] and np.any(unit.constant(inputs[2]) != 0):
        raise unit.refuse("a pad with a value other than 0 has no TOSA form")
    if len(inputs) > 3 and inputs[3]:
        raise unit.refuse("a pad of some axes (the axes input) has no TOSA form (pad every axis)")
    if attribute_text(unit.attributes, "mode", "constant") != "constant":
        raise unit.refuse("a pad of mode other than 'constant' has no TOSA form")
    pads = [int(p) for p in unit.constant(inputs[1]).tolist()]
    widths = [w for axis in source.perm for w in (pads[axis], pads[rank + axis])]
    name = unit.outputs[0]
    operands = [source.name, builder.shape(f"{name}.padding", widths), builder.zero_point(f"{name}.pad", source.dtype)]
    return [builder.operator(ts.Op.PAD, operands, name, unit.output_shape(), source.dtype, source.perm, attribute("PadAttribute"))]


@TOSA_FORMS.register(Op.UPSAMPLE_NEAREST2D)
def _upsample(builder: TosaBuilder, unit: OpUnit) -> list[TosaValue]:
    """RESIZE (NEAREST) by integer factors ``f``: output ``i`` reads input ``i // f``. TOSA rounds to the nearest
    source position, so each axis samples at ``(2i + 1 - f) / (2f)`` (scale ``2f / 2``, offset ``1 - f``), whose
    nearest integer is ``i // f``; the border makes the sizes agree."""
    attributes = unit.attributes
    coordinates = attribute_text(attributes, "coordinate_transformation_mode", "half_pixel")
    if (coordinates, attribute_text(attributes, "nearest_mode", "round_prefer_floor")) != ("asymmetric", "floor"):
        raise unit.refuse("a nearest resize other than edgeq's (asymmetric coordinates, floor) has no TOSA form")
    source = builder.in_layout(unit.inputs[0], NHWC)
    shape = unit.output_shape()
    scale, offset, border = [], [], []
    for size, out in zip(source.shape[2:], shape[2:]):
        factor = out // size
        scale += [2 * factor, 2]
        offset.append(1 - factor)
        border.append(2 * (out - 1) + offset[-1] - 2 * factor * (size - 1))
    name = unit.outputs[0]
    inputs = [source.name, builder.shape(f"{name}.scale", scale), builder.shape(f"{name}.offset", offset), builder.shape(f"{name}.border", border)]
    made = attribute("ResizeAttribute", ts.ResizeMode.NEAREST)
    return [builder.operator(ts.Op.RESIZE, inputs, name, shape, source.dtype, NHWC, made)]


@TOSA_FORMS.register(Op.MAX_POOL2D)
def _max_pool(builder: TosaBuilder, unit: OpUnit) -> list[TosaValue]:
    """MAX_POOL2D; padding never wins, in TOSA as in edgeq."""
    dilations = unit.attributes.get("dilations", (1, 1))
    if any(d != 1 for d in dilations):
        raise unit.refuse(f"a max pool with dilations {list(dilations)} has no TOSA form (allowed: 1)")
    pool = unit.settings
    kernel, stride = list(pool.kernel), list(pool.stride)
    shape, name = unit.output_shape(), unit.outputs[0]
    source, padding = window_input(builder, unit.inputs[0], shape[2:], kernel, stride, list(pool.pads), name)
    made = attribute("MaxPool2dAttribute", kernel, stride, padding, ts.NanPropagationMode.PROPAGATE)
    return [builder.operator(ts.Op.MAX_POOL2D, [source.name], name, shape, source.dtype, NHWC, made)]
