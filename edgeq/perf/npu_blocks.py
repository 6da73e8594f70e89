"""NPU layers costed by blocks: the model of an NPU whose target describes its MAC array's output micro-block
(``[hardware] micro_block``: the Arm Ethos-U's), after Vela's own model of it (its C++ core, ``EthosU55Performance``
and ``EthosU85Performance``: ``EstimateConvCycles``, ``EstimateOutputCyclesPerElement``).

The MAC array computes one micro-block of outputs per step. A dense convolution runs depth first (each tap of the
kernel over blocks of :data:`DEPTH_FIRST_INPUT_DEPTH` input channels) or, where that fills the array better,
part-kernel first (:data:`TAPS_PER_STEP` taps of :data:`PART_KERNEL_INPUT_DEPTH` channels per step); depthwise
convolutions and global pools step :data:`TAPS_PER_STEP` taps per output, pools one tap per output per
:data:`POOLING_CYCLES_PER_TAP` cycles; kernels run in sub-kernels of at most :data:`SUB_KERNEL` taps. A step over
few micro-blocks is bounded below by the write-back of its channels (:data:`WRITE_BACK_CYCLES_PER_CHANNEL`).
Every output then passes the output stage at ``output_cycles_per_element`` (``lookup_table_cycles_per_element``
with a lookup-table activation); ops the NPU runs as copies through a 1x1 pool (``pooled_copies``) take a pool's
steps too; other ops run on the elementwise units only, at ``elementwise_cycles`` per output element (channels in
bricks of :data:`BRICK_CHANNELS`). The array and the output stage work in a pipeline of output blocks no larger
than the accumulators' room in ``shram_bytes``. A layer waits for the weights the DMA could not bring while the
command before it ran (:func:`weight_dma`). A layer's memory traffic, and its first and last blocks, are
:mod:`edgeq.perf.npu_memory`'s. docs/perf.md, "NPU layers by blocks", gives the formulas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgeq.compile.compiled_graph import CompiledGraph, GraphOp
from edgeq.op_attrs import Conv2dAttrs, LinearAttrs, WindowAttrs
from edgeq.ops import LOOKUP_TABLE_OPS, Op
from edgeq.targets import Hardware

POOL_OPS = frozenset({Op.MAX_POOL2D.value, Op.AVG_POOL2D.value})
"""Ops the MAC array's pooling path runs, a tap per output per step."""

WINDOW_OPS = POOL_OPS | {Op.GLOBAL_AVG_POOL2D.value}
"""Ops with a window the MAC array runs (a global average pool as a depthwise convolution over the whole plane)."""

LOOKUP_TABLE_VALUES = frozenset(op.value for op in LOOKUP_TABLE_OPS)
"""The lookup-table activations' op names."""

ACTIVATIONS = frozenset({Op.RELU.value, *LOOKUP_TABLE_VALUES})
"""Ops the NPU applies on the way out of the op making their input (its output stage), at no cost of their own."""

CHAINED_OPS = frozenset({Op.ADD.value, Op.MUL.value})
"""Elementwise ops an NPU that chains them (the Ethos-U85) runs in the output stage of the op making an input."""

# Vela's architecture facts (its C++ core, EthosU55Performance::EstimateConvCycles and EstimateOutputCyclesPerElement,
# ArchEthosU55::FindBlockConfig; the U85's EthosU85Performance alike), for 8-bit feature maps:
SUB_KERNEL = (8, 8)
"""A kernel runs in sub-kernels of at most 8x8 taps (``s_SubkernelLimits``)."""
TAPS_PER_STEP = 4
"""A depthwise or part-kernel step sums 4 taps (``DivRoundUp(subKernelElements, 4)``)."""
DEPTH_FIRST_INPUT_DEPTH = 32
"""A depth-first convolution step reads a block of 32 input channels (``ifmBlockDepth``, 8-bit)..."""
PART_KERNEL_INPUT_DEPTH = 16
"""...a part-kernel step 16, 8 at a time (``DivRoundUp(ifmBlock.Depth(), 8)``)."""
PART_KERNEL_LANES = 8
"""Input channels a part-kernel step reads at once; a layer with at most this many always runs part-kernel first."""
POOLING_CYCLES_PER_TAP = 4
"""A pooling step costs ``ifmBits / 2`` cycles per tap, at least 4 taps (``max(4, subKernelElements)``)."""
WRITE_BACK_CYCLES_PER_CHANNEL = 4
"""A step takes at least ``cyclesWb = 32 x micro-block channels / 8`` cycles: the write-back of its channels."""
STEP_DELAY_CYCLES = 2
"""Each step after the first over a single micro-block waits 2 cycles (``delayCycles``, 32-bit accumulators)."""
ACCUMULATOR_BYTES = 4
"""A MAC layer accumulates in 32 bits..."""
ACCUMULATOR_BUFFERS = 2
"""...in two buffers of its block's outputs in the SHRAM (``TryBlockConfig``: ``acc_banks x 2``)."""
SCALE_BYTES_PER_CHANNEL = 10
"""Vela encodes an output channel's scale and bias in 10 bytes (its weight encoder's scale stream)."""
WEIGHT_SLICE_CHANNELS = 16
"""The DMA brings a layer's weights in slices of 16 output channels (``OFM_SPLIT_DEPTH``) where it slices them..."""
HIDDEN_TRANSFER_CYCLES = 1000
"""...which it does when bringing them whole would leave at least 1,000 cycles of the transfer visible
(``ProposeSlicedWeightBuffering``'s ``STARTUP_DELAY_CYCLES``): the first slice before the layer starts, the others
while it runs."""
BRICK_CHANNELS = 16
"""An elementwise op's feature maps are held in bricks of 16 channels (NHCWB16, ``GetStorageRounding``): it costs
its output's elements with the channels rounded up to 16 (``EstimateElementwiseCycles``)."""


@dataclass(frozen=True)
class BlockCost:
    """One NPU layer in cycles: the MAC array's (or pooling path's) steps, the output stage's or elementwise units'
    work and the share of the MAC array its shape keeps busy."""

    array_cycles: float
    elementwise_cycles: float
    utilisation: float

    blocks: int = 1
    """Output blocks the layer runs in (the array works on one while the output stage drains the one before)."""

    @property
    def compute_cycles(self) -> float:
        """The array and the output stage work in a pipeline of blocks: the slower one sets the pace, and the other
        one's share of the first (or last) block is not overlapped (Vela: ``cyclesDpuBlk x numOfmBlks +
        cyclesOutputBlk``)."""
        slower, faster = sorted((self.array_cycles, self.elementwise_cycles), reverse=True)
        return slower + faster / self.blocks


def _ceil_div(value: int, step: int) -> int:
    return -(-value // step)


def _ceil_to(value: int, step: int) -> int:
    return _ceil_div(value, step) * step


def _output_hwc(graph: CompiledGraph, op: GraphOp) -> tuple[int, int, int]:
    """An op's output as rows, columns and channels (NCHW; a matrix's rows as rows, its features as channels)."""
    shape = graph.tensors[op.outputs[0]].shape
    if len(shape) == 4:
        return shape[0] * shape[2], shape[3], shape[1]
    return math.prod(shape[:-1]) if len(shape) > 1 else 1, 1, shape[-1] if shape else 1


@dataclass(frozen=True)
class _Blocks:
    """An output in micro-blocks: per plane (rows x columns) and per channels, and the cycles a step takes."""

    plane: int
    depth: int
    step_cycles: int

    @property
    def total(self) -> int:
        """All the output's micro-blocks."""
        return self.plane * self.depth


def _micro_blocks(graph: CompiledGraph, op: GraphOp, hardware: Hardware, channels: int | None = None) -> _Blocks:
    """``op``'s output in micro-blocks, and the cycles of one step over them: as long as the micro-blocks of the
    plane take (one cycle each per 8 input channels of a step), at least the write-back of their channels."""
    assert hardware.micro_block is not None
    height, width, depth = hardware.micro_block
    rows, columns, out_channels = _output_hwc(graph, op)
    plane = _ceil_div(rows, height) * _ceil_div(columns, width)
    per_block = math.prod(hardware.micro_block) * DEPTH_FIRST_INPUT_DEPTH // hardware.int8_macs_per_cycle
    step = max(WRITE_BACK_CYCLES_PER_CHANNEL * depth, per_block * plane)
    return _Blocks(plane, _ceil_div(channels or out_channels, depth), step)


def _sub_kernels(kernel: tuple[int, ...]) -> list[int]:
    """The taps of each sub-kernel a kernel runs in."""
    rows, columns = kernel[0], kernel[-1]
    return [min(rows - y, SUB_KERNEL[0]) * min(columns - x, SUB_KERNEL[1]) for x in range(0, columns, SUB_KERNEL[1]) for y in range(0, rows, SUB_KERNEL[0])]


def _delay(blocks: _Blocks, steps: int) -> int:
    """The wait between steps over a single micro-block of the plane."""
    if blocks.plane != 1:
        return 0
    return STEP_DELAY_CYCLES * (steps if blocks.depth == 1 else (steps - 1) * blocks.depth)


def part_kernel(in_channels: int, taps: int) -> bool:
    """Whether Vela runs a dense convolution part-kernel first: few input channels, or a better share of the array
    filled by 4 taps x 8 channels than by 32 channels of one tap (``ChooseKernelMethod``)."""
    if in_channels <= PART_KERNEL_LANES:
        return True
    depth_first = in_channels / _ceil_to(in_channels, DEPTH_FIRST_INPUT_DEPTH)
    return in_channels / _ceil_to(in_channels, PART_KERNEL_LANES) * taps / _ceil_to(taps, TAPS_PER_STEP) >= depth_first


def _dense_cycles(kernel: tuple[int, ...], in_channels: int, blocks: _Blocks) -> int:
    """Cycles of a dense convolution (a linear layer: 1x1) over ``blocks``."""
    part = part_kernel(in_channels, math.prod(kernel))
    input_block = min(in_channels, _ceil_to(min(in_channels, PART_KERNEL_INPUT_DEPTH if part else DEPTH_FIRST_INPUT_DEPTH), PART_KERNEL_LANES))
    lanes = _ceil_div(input_block, PART_KERNEL_LANES) if part else 1
    cycles = 0
    for taps in _sub_kernels(kernel):
        steps = _ceil_div(taps, TAPS_PER_STEP) if part else taps
        cycles += (blocks.step_cycles * steps * blocks.depth + _delay(blocks, steps)) * lanes
    return cycles * _ceil_div(in_channels, input_block)


def _depthwise_cycles(kernel: tuple[int, ...], blocks: _Blocks) -> int:
    cycles = 0
    for taps in _sub_kernels(kernel):
        steps = _ceil_div(taps, TAPS_PER_STEP)
        cycles += blocks.step_cycles * steps * blocks.depth + _delay(blocks, steps)
    return cycles


def _array_cycles(graph: CompiledGraph, op: GraphOp, hardware: Hardware) -> float:
    """Cycles of the MAC array of a conv2d, linear or matmul layer, or of a pool."""
    attributes = op.attributes
    if isinstance(attributes, Conv2dAttrs):
        kernel = tuple(attributes.kernel)
        if attributes.depthwise:
            return _depthwise_cycles(kernel, _micro_blocks(graph, op, hardware))
        groups = attributes.groups
        blocks = _micro_blocks(graph, op, hardware, attributes.out_channels // groups)
        return groups * _dense_cycles(kernel, attributes.in_channels // groups, blocks)
    if op.op == Op.GLOBAL_AVG_POOL2D.value:
        return _depthwise_cycles(tuple(graph.tensors[op.inputs[0]].shape[2:]), _micro_blocks(graph, op, hardware))
    if op.op in POOL_OPS and isinstance(attributes, WindowAttrs):
        blocks = _micro_blocks(graph, op, hardware)
        return sum(max(TAPS_PER_STEP, taps) * POOLING_CYCLES_PER_TAP * blocks.total for taps in _sub_kernels(tuple(attributes.kernel)))
    if isinstance(attributes, LinearAttrs):
        return _dense_cycles((1, 1), attributes.in_features, _micro_blocks(graph, op, hardware))
    if op.op in hardware.pooled_copies:  # each output element once through a 1x1 pool
        return _micro_blocks(graph, op, hardware).total * TAPS_PER_STEP * POOLING_CYCLES_PER_TAP
    return op.macs / hardware.int8_macs_per_cycle


def output_blocks(outputs: int, hardware: Hardware) -> int:
    """How many blocks a layer of ``outputs`` elements runs in, at least: a block's accumulators, double-buffered,
    fit the NPU's ``shram_bytes`` (Vela's block search picks the block within that room); 1 without the figure."""
    if hardware.shram_bytes is None:
        return 1
    return max(1, _ceil_div(outputs * ACCUMULATOR_BYTES * ACCUMULATOR_BUFFERS, hardware.shram_bytes))


def block_cost(graph: CompiledGraph, op: GraphOp, hardware: Hardware, mac_layer: bool, lookup_table: bool = False) -> BlockCost:
    """The cycles of one NPU op (``mac_layer``: its MACs run on the MAC array; ``lookup_table``: a lookup-table
    activation in its output stage) on a block-model NPU."""
    outputs = sum(math.prod(graph.tensors[t].shape) for t in op.outputs)
    if mac_layer or op.op in WINDOW_OPS or op.op in hardware.pooled_copies:
        array = _array_cycles(graph, op, hardware)
        per_output = max(hardware.output_cycles_per_element, hardware.lookup_table_cycles_per_element if lookup_table else 0.0)
        output_stage = outputs * per_output
        utilisation = min(op.macs / (array * hardware.int8_macs_per_cycle), 1.0) if mac_layer and array > 0 else 1.0
        return BlockCost(array, output_stage, utilisation, output_blocks(outputs, hardware))
    rows, columns, channels = _output_hwc(graph, op)
    elements = rows * columns * _ceil_to(channels, BRICK_CHANNELS)
    return BlockCost(0.0, elements * hardware.elementwise_cycles.get(op.op, hardware.output_cycles_per_element), 1.0)


def weight_transfer_cycles(graph: CompiledGraph, op: GraphOp, hardware: Hardware, channels: int | None = None) -> float:
    """Cycles the NPU's DMA takes to bring a layer's weights (those of its first ``channels`` output channels) from
    the DRAM (the U55's flash) into the SRAM: their bytes at the DRAM's bandwidth after its read latency (Vela's
    ``MemToMemCycles``); 0 without weights. A global average pool, a depthwise convolution on the NPU, brings the
    scales and biases of its channels (:data:`SCALE_BYTES_PER_CHANNEL`)."""
    total = _out_channels(graph, op)
    weights = total * SCALE_BYTES_PER_CHANNEL if op.op == Op.GLOBAL_AVG_POOL2D.value else op.weight_bytes
    if not weights:
        return 0.0
    share = min(channels / total, 1.0) if channels is not None else 1.0
    return weights * share / hardware.dram_bandwidth_bytes_per_s * hardware.clock_hz + (hardware.dram_read_latency_cycles or 0)


@dataclass(frozen=True)
class WeightDma:
    """The NPU's DMA bringing a layer's weights: the cycles the layer waits for them before it starts, and the cycles
    the DMA keeps bringing the rest while it runs (busy for the layer after)."""

    wait: float = 0.0
    during: float = 0.0


def weight_dma(graph: CompiledGraph, op: GraphOp, hardware: Hardware, previous_cycles: float | None) -> WeightDma:
    """How the DMA brings a layer's weights while the NPU runs the command before (``previous_cycles``: the cycles
    that command leaves the DMA free): whole or, where that leaves :data:`HIDDEN_TRANSFER_CYCLES` or more to wait,
    their first slice before the layer starts and the others while it runs; what the command before does not cover
    shows. A region's first layer (None) streams its weights as it runs (Vela prebuffers no weights at the start
    of a command stream)."""
    whole = weight_transfer_cycles(graph, op, hardware)
    if previous_cycles is None or not whole:
        return WeightDma()
    if whole - previous_cycles >= HIDDEN_TRANSFER_CYCLES and _out_channels(graph, op) > WEIGHT_SLICE_CHANNELS:
        first = weight_transfer_cycles(graph, op, hardware, WEIGHT_SLICE_CHANNELS)
        return WeightDma(max(0.0, first - previous_cycles), whole - first)
    return WeightDma(max(0.0, whole - previous_cycles))


def _out_channels(graph: CompiledGraph, op: GraphOp) -> int:
    attributes = op.attributes
    if isinstance(attributes, (Conv2dAttrs, LinearAttrs)):
        return attributes.out_channels
    return _output_hwc(graph, op)[2] if op.outputs else 1


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


def fused_lookup_table(op: GraphOp, graph: CompiledGraph, computing_ops: frozenset[str]) -> bool:
    """Whether the NPU applies a lookup-table activation in ``op``'s output stage (:func:`fused_activation`)."""
    readers = graph.tensors[op.outputs[0]].consumers if op.outputs else []
    if len(readers) != 1:
        return False
    reader = graph.op(readers[0])
    return reader.op in LOOKUP_TABLE_VALUES and fused_activation(reader, graph, computing_ops)


def chained_elementwise(op: GraphOp, graph: CompiledGraph, computing_ops: frozenset[str]) -> bool:
    """Whether ``op`` is an elementwise op the NPU chains into the output stage of a MAC layer making one of its
    inputs (the Ethos-U85's, :attr:`~edgeq.targets.Hardware.chains_elementwise`): that layer computes in the same
    region and nothing else reads its output."""
    if op.op not in CHAINED_OPS:
        return False
    for name in op.inputs:
        tensor = graph.tensors[name]
        if tensor.producer in computing_ops and tensor.consumers == [op.name]:
            producer = graph.op(tensor.producer)
            if producer.region == op.region and producer.macs > 0 and producer.op not in WINDOW_OPS:
                return True
    return False


def input_reads(op: GraphOp, hardware: Hardware, mac_layer: bool) -> int:
    """How many times an NPU layer reads its input: once per block of output channels
    (``input_reads_per_channels``) for a convolution or linear layer that is not depthwise, else once."""
    attributes = op.attributes
    dense = isinstance(attributes, Conv2dAttrs) and not attributes.depthwise or isinstance(attributes, LinearAttrs)
    if mac_layer and dense and hardware.input_reads_per_channels is not None:
        return _ceil_div(attributes.out_channels, hardware.input_reads_per_channels)
    return 1
