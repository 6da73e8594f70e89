"""NPU layers costed by blocks: the model of an NPU whose target describes its MAC array's output micro-block
(``[hardware] micro_block``: the Arm Ethos-U's, as Vela's architecture describes it).

The MAC array computes one micro-block of outputs per step, each output summing ``int8_macs_per_cycle / block``
input channels of one kernel tap; a layer pays for whole blocks (rows, columns and channels rounded up) and whole
steps of input channels. Depthwise convolutions and pools sum one tap per output per step, their windows rounded
up to ``depthwise_taps_per_step``. Every output then passes the elementwise units (scale, round, activation);
other ops run on those units only, at ``elementwise_ops`` operations per output element. A layer's memory
traffic is :mod:`edgeq.perf.npu_memory`'s. docs/perf.md, "NPU layers by blocks", gives the formulas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgeq.compile.compiled_graph import CompiledGraph, GraphOp
from edgeq.op_attrs import Conv2dAttrs, LinearAttrs, WindowAttrs
from edgeq.ops import LOOKUP_TABLE_OPS, Op
from edgeq.targets import Hardware

WINDOW_OPS = frozenset({Op.MAX_POOL2D.value, Op.AVG_POOL2D.value, Op.GLOBAL_AVG_POOL2D.value})
"""Ops the MAC array's pooling path runs, a tap per output per step (like a depthwise convolution)."""

ACTIVATIONS = frozenset({Op.RELU.value, *(op.value for op in LOOKUP_TABLE_OPS)})
"""Ops the NPU applies on the way out of the op making their input (its output stage), at no cost of their own."""


@dataclass(frozen=True)
class BlockCost:
    """One NPU layer in cycles: the MAC array's (or pooling path's) steps, the elementwise units' work and the
    share of the MAC array its shape keeps busy."""

    array_cycles: float
    elementwise_cycles: float
    utilisation: float

    @property
    def compute_cycles(self) -> float:
        """The array and the elementwise units work in a pipeline: the slower one sets the pace."""
        return max(self.array_cycles, self.elementwise_cycles)


def _ceil_div(value: int, step: int) -> int:
    return -(-value // step)


def _output_hwc(graph: CompiledGraph, op: GraphOp) -> tuple[int, int, int]:
    """An op's output as rows, columns and channels (NCHW; a matrix's rows as rows, its features as channels)."""
    shape = graph.tensors[op.outputs[0]].shape
    if len(shape) == 4:
        return shape[0] * shape[2], shape[3], shape[1]
    return math.prod(shape[:-1]) if len(shape) > 1 else 1, 1, shape[-1] if shape else 1


def _blocks(graph: CompiledGraph, op: GraphOp, hardware: Hardware, channels: int | None = None) -> int:
    assert hardware.micro_block is not None
    height, width, depth = hardware.micro_block
    rows, columns, out_channels = _output_hwc(graph, op)
    return _ceil_div(rows, height) * _ceil_div(columns, width) * _ceil_div(channels or out_channels, depth)


def _input_depth(hardware: Hardware) -> int:
    assert hardware.micro_block is not None
    return max(hardware.int8_macs_per_cycle // math.prod(hardware.micro_block), 1)


def _array_cycles(graph: CompiledGraph, op: GraphOp, hardware: Hardware) -> float:
    """Steps of the MAC array (one cycle each) of a conv2d, linear or matmul layer, or of a pool."""
    attributes = op.attributes
    taps_step = hardware.depthwise_taps_per_step
    if isinstance(attributes, Conv2dAttrs):
        taps = math.prod(attributes.kernel)
        if attributes.depthwise:
            return _blocks(graph, op, hardware) * _ceil_div(taps, taps_step) * taps_step
        groups = attributes.groups
        per_group = _blocks(graph, op, hardware, attributes.out_channels // groups)
        return groups * per_group * taps * _ceil_div(attributes.in_channels // groups, _input_depth(hardware))
    if op.op in WINDOW_OPS:  # a global pool: the whole input plane
        window = attributes.kernel if isinstance(attributes, WindowAttrs) else graph.tensors[op.inputs[0]].shape[2:]
        return _blocks(graph, op, hardware) * _ceil_div(math.prod(window), taps_step) * taps_step
    if isinstance(attributes, LinearAttrs):
        return _blocks(graph, op, hardware) * _ceil_div(attributes.in_features, _input_depth(hardware))
    return op.macs / hardware.int8_macs_per_cycle


def block_cost(graph: CompiledGraph, op: GraphOp, hardware: Hardware, mac_layer: bool) -> BlockCost:
    """The cycles of one NPU op (``mac_layer``: its MACs run on the MAC array) on a block-model NPU."""
    outputs = sum(math.prod(graph.tensors[t].shape) for t in op.outputs)
    units = hardware.vector_ops_per_cycle
    if mac_layer or op.op in WINDOW_OPS:
        array = _array_cycles(graph, op, hardware)
        per_output = hardware.elementwise_ops.get(op.op, hardware.output_ops_per_element)
        utilisation = min(op.macs / (array * hardware.int8_macs_per_cycle), 1.0) if mac_layer and array > 0 else 1.0
        return BlockCost(array, outputs * per_output / units, utilisation)
    return BlockCost(0.0, outputs * hardware.elementwise_ops.get(op.op, 1.0) / units, 1.0)


def fused_activation(op: GraphOp, graph: CompiledGraph, computing_ops: frozenset[str]) -> bool:
    """Whether ``op`` is an activation the NPU applies in the output stage of the op making its only input: that
    op computes on the NPU (``computing_ops``: names of such ops in the graph, views excluded), in the same region,
    and nothing else reads its output."""
    if op.op not in ACTIVATIONS or len(op.inputs) != 1:
        return False
    tensor = graph.tensors[op.inputs[0]]
    if tensor.producer is None or tensor.producer not in computing_ops or tensor.consumers != [op.name]:
        return False
    return graph.op(tensor.producer).region == op.region


def input_reads(op: GraphOp, hardware: Hardware, mac_layer: bool) -> int:
    """How many times an NPU layer reads its input: once per block of output channels
    (``input_reads_per_channels``) for a convolution or linear layer that is not depthwise, else once."""
    attributes = op.attributes
    dense = isinstance(attributes, Conv2dAttrs) and not attributes.depthwise or isinstance(attributes, LinearAttrs)
    if mac_layer and dense and hardware.input_reads_per_channels is not None:
        return _ceil_div(attributes.out_channels, hardware.input_reads_per_channels)
    return 1
