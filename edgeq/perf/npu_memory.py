"""An NPU layer's memory traffic on a block-model NPU (the Arm Ethos-U's, as Vela models it): which memory its
feature maps and weights live in, how many bytes each memory moves for it, and how long each memory is busy.

Weights live in the DRAM (the U55's off-chip flash, the U65 / U85 DRAM) and are read once. A feature map lives in
the SRAM (the NPU's, or on a U65 / U85 the cache Vela keeps them in) when the NPU cascades its maker and its one
reader, or when it fits there whole beside its layer's; else in the DRAM, as a region's inputs and outputs do
under a dedicated-SRAM memory mode. A memory moves whole bursts of its burst length: the NPU reads an input in
runs of its depth (rounded up to the micro-block's channels) up to ``ifm_run_bytes`` and writes an output in runs
up to ``ofm_run_bytes``, so a burst longer than the run carries the run's bytes only. Each memory is busy for its
bytes over its bandwidth; the layer takes as long as the busier memory or its compute, whichever is longer
(Vela's ``max(npu cycles, memory access cycles)``); its first input block and last output block wait for their
memory's latency (:func:`block_latency_cycles`). docs/perf.md, "NPU layers by blocks", gives the formulas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgeq.compile.compiled_graph import CompiledGraph, GraphOp
from edgeq.targets import Hardware


@dataclass(frozen=True)
class MemoryTraffic:
    """Bytes an NPU layer moves through each memory, as the memory moves them (whole bursts): feature maps in the
    SRAM; feature maps and weights in the DRAM, and of those the ones it reads; and whether all its feature maps
    are in the SRAM."""

    sram_bytes: float
    dram_bytes: float
    dram_read_bytes: float
    in_sram: bool

    def seconds(self, hardware: Hardware) -> float:
        """How long the busier memory takes (the memories work in parallel); the DRAM at its bandwidth, and its
        reads no faster than :func:`dram_read_rate`."""
        sram_rate = hardware.sram_bandwidth_bytes_per_s or hardware.dram_bandwidth_bytes_per_s
        dram = max(self.dram_bytes / hardware.dram_bandwidth_bytes_per_s, self.dram_read_bytes / dram_read_rate(hardware))
        return max(self.sram_bytes / sram_rate, dram)


def dram_read_rate(hardware: Hardware) -> float:
    """Bytes per second the NPU reads the DRAM at: its port's bandwidth, or less when the reads a read buffer
    can keep in flight over the DRAM's latency cannot fill it (``dram_read_buffer_bytes``: Little's law)."""
    rate = float(hardware.dram_bandwidth_bytes_per_s)
    if hardware.dram_read_buffer_bytes is not None and hardware.dram_read_latency_cycles is not None:
        rate = min(rate, hardware.dram_read_buffer_bytes / hardware.dram_read_latency_cycles * hardware.clock_hz)
    return rate


def _depth_bytes(graph: CompiledGraph, tensor: str) -> int:
    """Bytes of one position's channels (NCHW: dimension 1; else the last)."""
    shape = graph.tensors[tensor].shape
    channels = shape[1] if len(shape) == 4 else (shape[-1] if shape else 1)
    element = graph.tensors[tensor].bytes // max(math.prod(shape), 1)
    return channels * max(element, 1)


def burst_factor(hardware: Hardware, burst: int | None, depth_bytes: int, run_limit: int | None) -> float:
    """How many bytes a memory with bursts of ``burst`` bytes moves per byte of a tensor of ``depth_bytes`` per
    position that the NPU accesses in runs of its depth (rounded up to the micro-block's channels) up to
    ``run_limit``: 1 while a run fills a burst."""
    if burst is None or run_limit is None:
        return 1.0
    assert hardware.micro_block is not None
    channels = hardware.micro_block[2]
    run = min(-(-depth_bytes // channels) * channels, run_limit)
    return burst / min(burst, run)


def cascaded(graph: CompiledGraph, tensor: str) -> bool:
    """Whether a tensor is made and read within one region by one op each: the NPU runs the two in a cascade
    (Vela's), the reader consuming rows as the maker writes them, so only a band of rows needs the SRAM."""
    made = graph.tensors[tensor]
    if made.producer is None or len(made.consumers) != 1:
        return False
    return graph.op(made.producer).region == graph.op(made.consumers[0]).region


def held(graph: CompiledGraph, tensor: str, hardware: Hardware) -> bool:
    """Whether a tensor the NPU cannot cascade (read by several ops: a residual's input) can stay whole in the SRAM
    while it lives: beside the input and output of the layers between its readers, two more of its size."""
    return 3 * graph.tensors[tensor].bytes <= hardware.sram_bytes


def lives_in_sram(graph: CompiledGraph, op: GraphOp, tensor: str, hardware: Hardware, borders: frozenset[str]) -> bool:
    """Whether an input or output of ``op`` lives in the SRAM (:func:`layer_traffic`)."""
    if hardware.region_io_in_dram and tensor in borders:
        return False
    return cascaded(graph, tensor) or op.bytes_in + op.bytes_out <= hardware.sram_bytes and held(graph, tensor, hardware)


def block_latency_cycles(graph: CompiledGraph, op: GraphOp, hardware: Hardware, blocks: int, borders: frozenset[str]) -> float:
    """Cycles of an NPU layer that its other work does not overlap: reading its first input block before the MAC
    array starts and writing its last output block after it stops, each the latency of the memory the tensor lives
    in and the block's bytes (the tensor's share of ``blocks``) at that memory's bandwidth (Vela's
    ``MinimumIfmCycles`` and ``MinimumOfmCycles``, which ``EstimateMacOpCycles`` adds for a layer's first and last
    block)."""

    def access(name: str, read: bool) -> float:
        if lives_in_sram(graph, op, name, hardware, borders):
            latency, bandwidth = hardware.sram_latency_cycles, hardware.sram_bandwidth_bytes_per_s or hardware.dram_bandwidth_bytes_per_s
        else:
            latency = (hardware.dram_read_latency_cycles or 0) if read else hardware.dram_write_latency_cycles
            bandwidth = hardware.dram_bandwidth_bytes_per_s
        return latency + graph.tensors[name].bytes / blocks / bandwidth * hardware.clock_hz

    first = max((access(name, True) for name in op.inputs), default=0.0)
    return first + max((access(name, False) for name in op.outputs), default=0.0)


def layer_traffic(graph: CompiledGraph, op: GraphOp, hardware: Hardware, input_reads: int, borders: frozenset[str]) -> MemoryTraffic:
    """The bytes an NPU layer moves through each memory: its inputs read ``input_reads`` times and its output
    written once, each in the memory it lives in, and its weights read once from the DRAM. One of ``borders`` (an
    NPU region's inputs and outputs, which the host hands over) lives in the DRAM where ``region_io_in_dram``;
    another feature map in the SRAM if it is :func:`cascaded`, or if the layer's input and output fit
    ``sram_bytes`` and it is :func:`held`; else in the DRAM."""
    sram = dram = dram_reads = 0.0
    for tensors, repeat, run in ((op.inputs, input_reads, hardware.ifm_run_bytes), (op.outputs, 1, hardware.ofm_run_bytes)):
        for name in tensors:
            in_sram = lives_in_sram(graph, op, name, hardware, borders)
            burst = hardware.sram_burst_bytes if in_sram else hardware.dram_burst_bytes
            moved = graph.tensors[name].bytes * repeat * burst_factor(hardware, burst, _depth_bytes(graph, name), run)
            if in_sram:
                sram += moved
            else:
                dram += moved
                dram_reads += moved if tensors is op.inputs else 0.0
    return MemoryTraffic(sram, dram + op.weight_bytes, dram_reads + op.weight_bytes, dram == 0)
