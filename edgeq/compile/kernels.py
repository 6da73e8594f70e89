"""edgeq's int8 kernels as TE computes in blocked layouts, ready for the default schedules.

Each kernel keeps the signature of the Relax op it replaces (NCHW int8 in, NCHW int32 accumulator out), so the
requantization epilogue fuses after it as before; inside, it packs the input so that ``depth`` input channels
are contiguous, multiplies with weights packed at compile time into ``lanes x depth`` blocks, and unpacks the
int32 accumulator. Channels are padded with zeros to whole blocks (any channel count works). Block names are
the contract with :mod:`edgeq.compile.schedules` and :mod:`edgeq.compile.layout_plan` (which, after fusion, may
store a kernel's int8 input and output in blocks of channels and its packed input in the same blocks).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from tvm import te, tirx

from edgeq.compile.cpu_features import DotProduct

PACK = "edgeq_pack_input"
CONV = "edgeq_conv2d"
DEPTHWISE = "edgeq_depthwise_conv2d"
DENSE = "edgeq_dense"
UNPACK = "edgeq_unpack"
KERNEL_BLOCKS = (CONV, DEPTHWISE, DENSE)
"""The reduction block of each kernel (its name tells the schedule which kernel it is)."""


def _blocks(count: int, size: int) -> int:
    return -(-count // size)


def _activation(value: tirx.PrimExpr, dot: DotProduct) -> tirx.PrimExpr:
    """An int8 activation as the dot product takes it (``x + 128`` as uint8 for VNNI, widened for AVX2)."""
    if dot.unsigned_activations:
        return (value.astype("int16") + 128).astype("uint8")
    return value.astype(dot.activations)


def _correction(weights: np.ndarray, unsigned: bool) -> np.ndarray:
    """The per-output-channel int32 a kernel subtracts: ``128·Σw`` for ``unsigned`` (uint8) activations, else
    zeros."""
    out_channels = weights.shape[0]
    correction = 128 * weights.reshape(out_channels, -1).astype(np.int64).sum(axis=1) if unsigned else np.zeros(out_channels)
    return correction.astype(np.int32)


def first_input_block(block, lanes: int, depth: int, in_per_group: int, out_per_group: int):
    """The first block of ``depth`` input channels that output-channel block ``block`` (of ``lanes``) reads in a
    grouped convolution: its first channel's group's first input channel, in blocks. ``block`` is an int or a TIR
    expression (the same arithmetic in both)."""
    return block * lanes // out_per_group * in_per_group // depth


def window_blocks(out_channels: int, in_per_group: int, groups: int, lanes: int, depth: int) -> int:
    """Blocks of ``depth`` input channels the widest output-channel block of a grouped convolution reads (from
    :func:`first_input_block` to the end of its last channel's group)."""
    out_per_group = out_channels // groups
    widest = 0
    for block in range(_blocks(out_channels, lanes)):
        last_group = (min(block * lanes + lanes, out_channels) - 1) // out_per_group
        end = _blocks((last_group + 1) * in_per_group, depth)
        widest = max(widest, end - first_input_block(block, lanes, depth, in_per_group, out_per_group))
    return widest


def pack_conv_weights(weights: np.ndarray, dot: DotProduct, groups: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """OIHW int8 weights -> ``[oc/lanes, window/depth, kh, kw, lanes, depth]`` (zero-padded), and the per-channel
    int32 correction the kernel subtracts (:func:`_correction`).

    With ``groups`` groups, each block of ``lanes`` output channels reads a window of input channels: from its first
    channel's group's (:func:`first_input_block`) to its last's, as wide as the widest block's; a lane's weights
    are zeros outside its group. Groups 1: every block reads all input channels."""
    oc, in_per_group, kh, kw = weights.shape
    lanes, depth = dot.lanes, dot.depth
    out_per_group, out_blocks = oc // groups, _blocks(oc, lanes)
    window = window_blocks(oc, in_per_group, groups, lanes, depth) * depth
    starts = [first_input_block(block, lanes, depth, in_per_group, out_per_group) * depth for block in range(out_blocks)]
    dense = np.zeros((out_blocks * lanes, starts[-1] + window, kh, kw), np.int8)  # zeros across groups and past them
    for group in range(groups):
        channels = slice(group * out_per_group, (group + 1) * out_per_group)
        dense[channels, group * in_per_group : (group + 1) * in_per_group] = weights[channels]
    blocks = [dense[block * lanes : (block + 1) * lanes, start : start + window] for block, start in enumerate(starts)]
    packed = np.stack(blocks).reshape(-1, lanes, window // depth, depth, kh, kw).transpose(0, 2, 4, 5, 1, 3)
    return np.ascontiguousarray(packed), _correction(weights, dot.unsigned_activations)


def _output_size(data: te.Tensor, kernel: tuple[int, int], strides, padding, dilation) -> tuple[int, int]:
    """Output height and width of a convolution over NCHW ``data`` (``padding`` as top, left, bottom, right)."""
    h, w = (int(d) for d in data.shape[2:])
    top, left, bottom, right = padding
    out_h = (h + top + bottom - (kernel[0] - 1) * dilation[0] - 1) // strides[0] + 1
    out_w = (w + left + right - (kernel[1] - 1) * dilation[1] - 1) // strides[1] + 1
    return out_h, out_w


def _pack_padded(data: te.Tensor, blocks: int, depth: int, padding, convert: Callable, pad_value: int = 0) -> te.Tensor:
    """NCHW int8 ``data`` -> ``[N, blocks, H + pads, W + pads, depth]``: channels in blocks of ``depth``,
    ``pad_value`` in the padding and past the last channel (whose weights are zeros), each value passed through
    ``convert``."""
    n, channels, h, w = (int(d) for d in data.shape)
    top, left, bottom, right = padding

    def pack(b, c_block, y, x, c):
        channel = c_block * depth + c
        inside = tirx.all(channel < channels, y >= top, y < h + top, x >= left, x < w + left)
        return convert(tirx.if_then_else(inside, data[b, channel, y - top, x - left], tirx.const(pad_value, "int8")))

    return te.compute((n, blocks, h + top + bottom, w + left + right, depth), pack, name=PACK)


def conv2d(
    data: te.Tensor,
    packed: te.Tensor,
    correction: te.Tensor,
    channels: int,
    strides,
    padding,
    dilation,
    dot: DotProduct,
    pad_value: int = 0,
    groups: int = 1,
) -> te.Tensor:
    """NCHW int8 ``data`` x packed weights (:func:`pack_conv_weights`) -> NCHW int32 accumulator with ``channels``
    channels, the input padded with ``pad_value`` (an input's zero point, docs/numerics.md section 9). In ``groups``
    groups, each block of output channels sums over its window of input channels only."""
    n, in_channels = (int(d) for d in data.shape[:2])
    out_blocks, window, kh, kw, lanes, depth = (int(d) for d in packed.shape)
    out_h, out_w = _output_size(data, (kh, kw), strides, padding, dilation)

    def input_block(o, rc):  # block rc of the input channels output block o reads (groups 1: all of them)
        return first_input_block(o, lanes, depth, in_channels // groups, channels // groups) + rc if groups > 1 else rc

    source = _pack_padded(data, input_block(out_blocks - 1, window), depth, padding, lambda value: _activation(value, dot), pad_value)
    rc, ry, rx, rk = (te.reduce_axis((0, e), name) for e, name in ((window, "rc"), (kh, "ry"), (kw, "rx"), (depth, "rk")))
    acc = te.compute(
        (n, out_blocks, out_h, out_w, lanes),
        lambda b, o, y, x, lane: te.sum(
            source[b, input_block(o, rc), y * strides[0] + ry * dilation[0], x * strides[1] + rx * dilation[1], rk].astype("int32")
            * packed[o, rc, ry, rx, lane, rk].astype("int32"),
            axis=[rc, ry, rx, rk],
        ),
        name=CONV,
    )
    return te.compute(
        (n, channels, out_h, out_w), lambda b, c, y, x: acc[b, c // lanes, y, x, c % lanes] - correction[c], name=UNPACK
    )


DEPTHWISE_TAPS = 4
"""Taps of a row a depthwise dot product sums per channel (``vpdpbusd``: 4 bytes per int32 lane)."""


def depthwise_dot_product(dot: DotProduct, dilation) -> bool:
    """Whether a depthwise convolution uses the CPU's depthwise dot product (:data:`DEPTHWISE_TAPS` neighbouring
    taps at once; undilated only), else int16 products."""
    return dot.depthwise_intrinsic is not None and tuple(dilation) == (1, 1)


def pack_depthwise_weights(weights: np.ndarray, dot: DotProduct, dilation) -> tuple[np.ndarray, np.ndarray]:
    """``[C, 1, kh, kw]`` int8 weights -> ``[C/lanes, kh, kw, lanes]`` for int16 products, or for the depthwise
    dot product ``[C/lanes, kh, kw/4, lanes, 4]`` (each row's taps zero-padded to groups of
    :data:`DEPTHWISE_TAPS`); channels zero-padded; and the correction (:func:`_correction`)."""
    c, _, kh, kw = weights.shape
    lanes = dot.depthwise_lanes
    dot_product = depthwise_dot_product(dot, dilation)
    taps = _blocks(kw, DEPTHWISE_TAPS) * DEPTHWISE_TAPS if dot_product else kw
    padded = np.zeros((_blocks(c, lanes) * lanes, kh, taps), np.int8)
    padded[:c, :, :kw] = weights[:, 0]
    packed = padded.reshape(-1, lanes, kh, taps).transpose(0, 2, 3, 1)
    if dot_product:
        packed = packed.reshape(-1, kh, taps // DEPTHWISE_TAPS, DEPTHWISE_TAPS, lanes).transpose(0, 1, 2, 4, 3)
    return np.ascontiguousarray(packed), _correction(weights, dot_product and dot.unsigned_activations)


def depthwise_conv2d(
    data: te.Tensor, packed: te.Tensor, correction: te.Tensor | None, kernel_width: int, strides, padding, dilation, dot: DotProduct, pad_value: int = 0
) -> te.Tensor:
    """NCHW int8 ``data`` x packed depthwise weights (:func:`pack_depthwise_weights`) -> NCHW int32 accumulator,
    the input padded with ``pad_value``: by the depthwise dot product (uint8 activations where it takes them, the
    ``correction`` subtracted: None for none), or by int16 products widened to int32 (exact either way)."""
    n, channels = (int(d) for d in data.shape[:2])
    c_blocks, kh = (int(d) for d in packed.shape[:2])
    out_h, out_w = _output_size(data, (kh, kernel_width), strides, padding, dilation)
    ry = te.reduce_axis((0, kh), "ry")
    if depthwise_dot_product(dot, dilation):
        _, _, groups, lanes, taps = (int(d) for d in packed.shape)
        top, left, bottom, right = padding
        read_width = (out_w - 1) * strides[1] + groups * taps  # the zero-weight taps past the window read padding
        right += max(0, read_width - (int(data.shape[3]) + left + right))
        source = _pack_padded(data, c_blocks, lanes, (top, left, bottom, right), lambda value: _activation(value, dot), pad_value)
        rg, rt = te.reduce_axis((0, groups), "rg"), te.reduce_axis((0, taps), "rt")
        acc = te.compute(
            (n, c_blocks, out_h, out_w, lanes),
            lambda b, o, y, x, lane: te.sum(
                source[b, o, y * strides[0] + ry, x * strides[1] + rg * taps + rt, lane].astype("int32")
                * packed[o, ry, rg, lane, rt].astype("int32"),
                axis=[ry, rg, rt],
            ),
            name=DEPTHWISE,
        )
    else:
        lanes = int(packed.shape[-1])
        source = _pack_padded(data, c_blocks, lanes, padding, lambda value: value, pad_value)
        rx = te.reduce_axis((0, kernel_width), "rx")
        acc = te.compute(
            (n, c_blocks, out_h, out_w, lanes),
            lambda b, o, y, x, lane: te.sum(
                (
                    source[b, o, y * strides[0] + ry * dilation[0], x * strides[1] + rx * dilation[1], lane].astype("int16")
                    * packed[o, ry, rx, lane].astype("int16")
                ).astype("int32"),
                axis=[ry, rx],
            ),
            name=DEPTHWISE,
        )

    def unpack(b, c, y, x):
        value = acc[b, c // lanes, y, x, c % lanes]
        return value if correction is None else value - correction[c]

    return te.compute((n, channels, out_h, out_w), unpack, name=UNPACK)


LOOKUP = "edgeq_lookup"
"""The block of :func:`lookup`."""


def lookup(source: te.Tensor, table: te.Tensor, offset: int = 0) -> te.Tensor:
    """``table[source + offset]`` for every element of ``source``, indices clipped to the table, as TVM's ``take``
    with mode ``clip`` of ``source + offset`` (a table activation's are in it already: an int8 ``x`` and 128)."""
    last = int(table.shape[0]) - 1

    def entry(*i: tirx.PrimExpr) -> tirx.PrimExpr:
        index = source(*i).astype("int32") + tirx.const(offset, "int32")
        return table[tirx.max(tirx.min(index, last), 0)]

    return te.compute(source.shape, entry, name=LOOKUP)


ROUNDING_OFFSET = 1.5 * 2.0**52
"""Added to a float64 below 2**51 in magnitude, it leaves the value rounded half to even to an integer in the
low bits of the sum (the ulp of [2**52, 2**53) is 1; the current rounding mode, nearest even, rounds)."""


def round_to_int32(data: te.Tensor) -> te.Tensor:
    """``int32(nearbyint(x))`` of a float64 tensor whose rounded values fit int32, as the low 32 bits of
    ``x + 1.5·2**52`` (:data:`ROUNDING_OFFSET`): an add and a narrowing move where ``nearbyint`` and a conversion
    cost a rounding and a two-step convert. Equal wherever the original is defined (its result fits int32)."""

    def rounded(*index):
        return tirx.reinterpret("int64", data(*index) + tirx.const(ROUNDING_OFFSET, "float64")).astype("int32")

    return te.compute(data.shape, rounded, name="round_to_int32")


def pack_dense_weights(weights: np.ndarray, dot: DotProduct) -> tuple[np.ndarray, np.ndarray]:
    """``[in, out]`` int8 weights -> ``[out/lanes, in/depth, lanes, depth]``, and the correction (as for convs)."""
    packed, correction = pack_conv_weights(weights.T[:, :, None, None], dot)
    return np.ascontiguousarray(packed[:, :, 0, 0]), correction


def dense(data: te.Tensor, packed: te.Tensor, correction: te.Tensor, features: int, dot: DotProduct) -> te.Tensor:
    """``[..., in]`` int8 ``data`` x packed weights -> ``[..., features]`` int32 accumulator."""
    *lead, size = (int(d) for d in data.shape)
    _, in_blocks, lanes, depth = (int(d) for d in packed.shape)

    def pack(*index):
        *rows, block, k = index
        channel = block * depth + k
        return _activation(tirx.if_then_else(channel < size, data[(*rows, channel)], tirx.const(0, "int8")), dot)

    source = te.compute((*lead, in_blocks, depth), pack, name=PACK)
    rc, rk = te.reduce_axis((0, in_blocks), "rc"), te.reduce_axis((0, depth), "rk")
    acc = te.compute(
        (*lead, packed.shape[0], lanes),
        lambda *index: te.sum(
            source[(*index[:-2], rc, rk)].astype("int32") * packed[index[-2], rc, index[-1], rk].astype("int32"), axis=[rc, rk]
        ),
        name=DENSE,
    )
    return te.compute(
        (*lead, features), lambda *index: acc[(*index[:-1], index[-1] // lanes, index[-1] % lanes)] - correction[index[-1]], name=UNPACK
    )
