"""TOSA forms of the ops that accumulate products in int32 and requantize: conv2d (CONV2D, DEPTHWISE_CONV2D, or
a CONV2D per group), linear (a 1x1 CONV2D), the average pools (a DEPTHWISE_CONV2D of ones: the window sum, padding
counted as zeros), matmul (MATMUL) and mul (MUL); each accumulator then one RESCALE with edgeq's multipliers and
shifts (docs/numerics.md sections 5-7), which under the half_up rule is exactly TOSA's SINGLE_ROUND."""

from __future__ import annotations

import math

import numpy as np
import tosa_serializer as ts

from edgeq.export.onnx_nodes import node_name
from edgeq.export.tosa.builder import NHWC, TosaBuilder, TosaValue, attribute, identity
from edgeq.export.tosa.forms.unit import TOSA_FORMS, OpUnit
from edgeq.export.tosa.forms.windows import window_input
from edgeq.numerics import INT32_MAX, product_accumulator_bound
from edgeq.ops import Op


def _requantized(builder: TosaBuilder, unit: OpUnit, acc: TosaValue, bound: int) -> TosaValue:
    """The int32 accumulator ``acc`` (``|acc| <= bound``) requantized to int8 with the op's constants (``acc``
    itself for an int32 output)."""
    constants = unit.requantization()
    if constants is None:
        return acc
    shifts = constants.shift * len(constants.multiplier) if len(constants.shift) == 1 else constants.shift
    return builder.rescale(acc, constants.multiplier, shifts, ts.DType.INT8, unit.outputs[0], what=unit.what, value_range=(-bound, bound))


def _accumulator_bound(unit: OpUnit) -> int:
    """The largest ``|acc|`` of a conv or linear layer (int32's when the check could not bound it)."""
    return max(unit.record.quant.accumulator_bounds or (INT32_MAX,))


def _convolution(
    builder: TosaBuilder, unit: OpUnit, source: TosaValue, weights: np.ndarray, bias: np.ndarray,
    *, stride: list[int], dilation: list[int], pads: list[int], groups: int,
) -> TosaValue:
    """The int32 accumulator (NHWC) of a convolution of int8 ``source`` with OIHW ``weights`` in ``groups`` and the
    int32 ``bias``, to the op's output size: CONV2D for one group, DEPTHWISE_CONV2D for a group per input channel,
    otherwise a CONV2D per group (its channels sliced) and the accumulators concatenated."""
    output_shape = unit.output_shape()
    out_channels, group_channels, kh, kw = weights.shape
    extents = [(k - 1) * d + 1 for k, d in zip((kh, kw), dilation)]
    name = unit.outputs[0]
    source, padding = window_input(builder, source, output_shape[2:], extents, stride, pads, name)
    shape = (output_shape[0], out_channels, *output_shape[2:])
    if groups == 1 or group_channels == 1:
        depthwise = groups != 1
        kernel = weights.reshape(groups, out_channels // groups, kh, kw).transpose(2, 3, 0, 1) if depthwise else weights.transpose(0, 2, 3, 1)
        return _convolution_operator(builder, name, source, kernel, bias, shape, padding, stride, dilation, depthwise)
    per_group = out_channels // groups
    parts = []
    for group in range(groups):
        sizes = [*source.shape[:1], group_channels, *source.shape[2:]]
        part = builder.slice(source, [0, group * group_channels, 0, 0], sizes, f"{name}.group{group}.input")
        rows = slice(group * per_group, (group + 1) * per_group)
        kernel = weights[rows].transpose(0, 2, 3, 1)
        group_shape = (shape[0], per_group, *shape[2:])
        parts.append(_convolution_operator(builder, f"{name}.group{group}", part, kernel, bias[rows], group_shape, padding, stride, dilation, False))
    made = attribute("ConcatAttribute", NHWC.index(1))
    return builder.operator(ts.Op.CONCAT, [p.name for p in parts], f"{name}.acc", shape, ts.DType.INT32, NHWC, made)


def _convolution_operator(
    builder: TosaBuilder, name: str, source: TosaValue, kernel: np.ndarray, bias: np.ndarray, shape: tuple[int, ...],
    padding: list[int], stride: list[int], dilation: list[int], depthwise: bool,
) -> TosaValue:
    """The CONV2D / DEPTHWISE_CONV2D operator of an NHWC ``source`` and a kernel in TOSA's order, int32 out."""
    op, kind = (ts.Op.DEPTHWISE_CONV2D, "DepthwiseConv2dAttribute") if depthwise else (ts.Op.CONV2D, "Conv2dAttribute")
    inputs = [
        source.name,
        builder.const(f"{name}.weight", kernel, ts.DType.INT8),
        builder.const(f"{name}.bias", bias.reshape(-1), ts.DType.INT32),
        builder.zero_point(f"{name}.input", ts.DType.INT8),
        builder.zero_point(f"{name}.weight", ts.DType.INT8),
    ]
    made = attribute(kind, padding, list(stride), list(dilation), False, ts.DType.INT32)
    return builder.operator(op, inputs, f"{name}.acc", shape, ts.DType.INT32, NHWC, made)


def _bias(unit: OpUnit, tensor: str | None, channels: int) -> np.ndarray:
    values = unit.constant(tensor) if tensor else np.zeros(channels, dtype=np.int32)
    return np.broadcast_to(values.reshape(-1), (channels,)).astype(np.int32)


@TOSA_FORMS.register(Op.CONV2D)
def _conv2d(builder: TosaBuilder, unit: OpUnit) -> list[TosaValue]:
    """The convolution's int32 accumulator (:func:`_convolution`), then RESCALE per output channel."""
    conv, weights = unit.settings, unit.constant(unit.node.input[1])
    acc = _convolution(
        builder, unit, unit.inputs[0], weights, _bias(unit, (unit.node.input[2:3] or [""])[0], weights.shape[0]),
        stride=list(conv.stride), dilation=list(conv.dilation), pads=list(conv.pads), groups=conv.groups,
    )
    return [_requantized(builder, unit, acc, _accumulator_bound(unit))]


@TOSA_FORMS.register(Op.LINEAR)
def _linear(builder: TosaBuilder, unit: OpUnit) -> list[TosaValue]:
    """A 1x1 CONV2D over the rows of ``[..., K]`` (Vela's fully connected form), then RESCALE per output."""
    node, attributes = unit.node, unit.attributes
    if node.op_type == "Gemm" and (attributes.get("alpha", 1.0), attributes.get("beta", 1.0), attributes.get("transA", 0)) != (1.0, 1.0, 0):
        raise unit.refuse("a Gemm with alpha, beta or transA has no TOSA form")
    weights = unit.constant(node.input[1])
    if not (node.op_type == "Gemm" and attributes.get("transB", 0)):
        weights = weights.T
    bias_add = unit.graph.bias_adds.get(node_name(node))  # a linear layer over more than two axes: MatMul, then Add
    bias_tensor = (node.input[2:3] or [""])[0] if bias_add is None else next(t for t in bias_add.input if t != node.output[0])
    source, output_shape, name = unit.inputs[0], unit.output_shape(), unit.outputs[0]
    rows, (out_features, in_features) = math.prod(source.shape[:-1]), weights.shape
    pixels = builder.in_layout(builder.reshape(source, (rows, in_features, 1, 1), f"{name}.rows"), NHWC)
    kernel = weights.reshape(out_features, 1, 1, in_features)
    acc = _convolution_operator(
        builder, name, pixels, kernel, _bias(unit, bias_tensor, out_features), (rows, out_features, 1, 1), [0, 0, 0, 0], [1, 1], [1, 1], False,
    )
    return [builder.reshape(_requantized(builder, unit, acc, _accumulator_bound(unit)), output_shape, f"{name}.out")]


@TOSA_FORMS.register(Op.AVG_POOL2D, Op.GLOBAL_AVG_POOL2D)
def _average(builder: TosaBuilder, unit: OpUnit) -> list[TosaValue]:
    """The window sum as a DEPTHWISE_CONV2D of ones (padding counted as zeros, as edgeq's pool), then one RESCALE
    by ``s_in / (s_out * N)``: edgeq's single rounding, where AVG_POOL2D would round twice."""
    source, attributes = unit.inputs[0], unit.attributes
    channels, height, width = source.shape[1:]
    if unit.op is Op.GLOBAL_AVG_POOL2D:
        kernel, stride, pads = [height, width], [1, 1], [0, 0, 0, 0]
    else:
        if not attributes.get("count_include_pad", 0) or attributes.get("ceil_mode", 0):
            raise unit.refuse("an average pool without count_include_pad, or with ceil_mode, is not edgeq's average")
        pool = unit.settings
        kernel, stride, pads = list(pool.kernel), list(pool.stride), list(pool.pads)
    ones = np.ones((channels, 1, *kernel), dtype=np.int8)
    acc = _convolution(
        builder, unit, source, ones, np.zeros(channels, dtype=np.int32), stride=stride, dilation=[1, 1], pads=pads, groups=channels,
    )
    return [_requantized(builder, unit, acc, 128 * math.prod(kernel))]


@TOSA_FORMS.register(Op.MATMUL)
def _matmul(builder: TosaBuilder, unit: OpUnit) -> list[TosaValue]:
    """MATMUL of ``[B, M, K]`` and ``[B, K, N]`` (the leading axes folded into B) into int32, then RESCALE."""
    left, right = unit.inputs
    if left.shape[:-2] != right.shape[:-2]:
        raise unit.refuse(f"leading axes {left.shape[:-2]} and {right.shape[:-2]} differ; a broadcast matmul has no TOSA form")
    batch = math.prod(left.shape[:-2])
    name = unit.outputs[0]
    folded = [builder.reshape(v, (batch, *v.shape[-2:]), f"{name}.{side}") for v, side in ((left, "a"), (right, "b"))]
    inputs = [folded[0].name, folded[1].name, builder.zero_point(f"{name}.a", ts.DType.INT8), builder.zero_point(f"{name}.b", ts.DType.INT8)]
    shape = (batch, left.shape[-2], right.shape[-1])
    acc = builder.operator(ts.Op.MATMUL, inputs, f"{name}.acc", shape, ts.DType.INT32, identity(3), attribute("MatMulAttribute"))
    result = _requantized(builder, unit, acc, product_accumulator_bound(left.shape[-1]))
    return [builder.reshape(result, unit.output_shape(), f"{name}.out")]


@TOSA_FORMS.register(Op.MUL)
def _mul(builder: TosaBuilder, unit: OpUnit) -> list[TosaValue]:
    """MUL of the int8 values into int32 (exact: ``|a * b| <= 2**14``), broadcasting, then RESCALE."""
    shape = unit.output_shape()
    left, right = (builder.broadcastable(v, len(shape), f"{unit.outputs[0]}.{i}") for i, v in enumerate(unit.inputs))
    name = unit.outputs[0]
    inputs = [left.name, right.name, builder.const(f"{name}.shift", np.zeros(1), ts.DType.INT8)]
    product = builder.operator(ts.Op.MUL, inputs, f"{name}.product", shape, ts.DType.INT32, left.perm, attribute("MulAttribute"))
    return [_requantized(builder, unit, product, product_accumulator_bound())]
