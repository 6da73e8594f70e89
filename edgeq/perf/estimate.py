"""The cost model: every op of a compiled graph, every NPU<->CPU transition, and the totals (docs/perf.md).

NPU layers are costed with the target's ``[hardware]`` figures, CPU layers (CPU targets, and what falls back to
the host of an NPU target) with the host CPU's :class:`~edgeq.targets.CpuFigures`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from edgeq.check.report import FLOAT_PLACEMENT
from edgeq.compile import kernels, kernels_dot_product
from edgeq.compile.compiled_graph import CompiledGraph, GraphOp
from edgeq.compile.cpu_features import DOT_PRODUCTS, DotProduct
from edgeq.compile.layout_plan import is_blocked
from edgeq.errors import EdgeqError
from edgeq.op_attrs import Conv2dAttrs, LinearAttrs
from edgeq.ops import LOOKUP_TABLE_OPS, Op, OpTable, op_named
from edgeq.perf.npu_blocks import WINDOW_OPS, block_cost, chained_elementwise, fused_activation, fused_lookup_table, input_reads, weight_dma
from edgeq.perf.npu_memory import block_latency_cycles, layer_traffic
from edgeq.perf.result import LayerEstimate, PerfResult, PerfSummary, TransitionEstimate
from edgeq.targets import HOST_CODE_ADVICE, CpuFigures, Hardware, Target, TargetKind, host_cpu

MS = 1e3

MAC_CLASSES = ("conv2d", "pointwise", "depthwise", "linear")
"""The CPU's int8 MAC rates (:func:`mac_class`), in the order of :data:`CPU_RATES`."""

CPU_RATES = (
    "conv2d_int8_macs_per_s",
    "pointwise_int8_macs_per_s",
    "depthwise_int8_macs_per_s",
    "linear_int8_macs_per_s",
    "requantized_outputs_per_s",
    "packed_inputs_per_s",
)
"""The :class:`~edgeq.targets.CpuFigures` rates an int8 MAC kernel's compute time is the sum of the work at
(:func:`cpu_work`), in its order."""

MacClassOf = Callable[[GraphOp], str]
"""Which of :data:`MAC_CLASSES` an op's MACs run at, from its attributes."""

VIEW = "view"
"""The cost class of an op that costs nothing where it is a view: the NPU reads its input's bytes with another
shape, and on a CPU it has no kernel call of its own when TVM makes it a view."""

COST_CLASSES: OpTable[MacClassOf | str | None] = OpTable("cost class in perf/estimate.py")
"""Each op's cost class: for the ops whose MACs run on the NPU's MAC array and in the CPU's int8 matrix kernels
(with a requantized output), the :data:`MacClassOf` that names their CPU rate; :data:`VIEW` for a reshape;
``None`` for the ops costed by the bytes they move (and on the NPU, by their operations on its vector unit)."""


@COST_CLASSES.register(Op.CONV2D)
def _conv2d_class(op: GraphOp) -> str:
    """``depthwise`` (a group per channel), ``pointwise`` (1x1) or ``conv2d`` (a window larger than 1x1). Grouped
    convolutions run in the conv2d kernel (:func:`edgeq.compile.kernels.conv2d`), and so does a convolution whose
    settings the check could not read."""
    conv = op.attributes
    if not isinstance(conv, Conv2dAttrs):
        return "conv2d"
    if conv.depthwise:
        return "depthwise"
    return "pointwise" if math.prod(conv.kernel) == 1 else "conv2d"


COST_CLASSES.register(Op.LINEAR, Op.MATMUL)(lambda op: "linear")
COST_CLASSES.register(
    Op.ADD,
    Op.MUL,
    Op.CONCAT,
    Op.RELU,
    Op.MAX_POOL2D,
    Op.AVG_POOL2D,
    Op.GLOBAL_AVG_POOL2D,
    Op.UPSAMPLE_NEAREST2D,
    Op.UPSAMPLE_BILINEAR2D,
    Op.TRANSPOSE,
    Op.SPLIT,
    Op.SLICE,
    Op.PAD,
    *LOOKUP_TABLE_OPS,
)(None)
COST_CLASSES.register(Op.RESHAPE)(VIEW)


def mac_class(op: GraphOp) -> str | None:
    """Which CPU rate an op's MACs run at (:data:`COST_CLASSES`): ``conv2d``, ``pointwise``, ``depthwise`` or
    ``linear`` (linear layers and matmuls); None for ops costed by the bytes they move (an op edgeq does not know
    among them)."""
    of = _cost_class(op)
    return of(op) if callable(of) else None


def _cost_class(op: GraphOp) -> MacClassOf | str | None:
    known = op_named(op.op)
    return COST_CLASSES[known] if known is not None else None


def view_op(op: GraphOp) -> bool:
    """Whether ``op`` costs nothing where it is a view (:data:`VIEW`)."""
    return _cost_class(op) == VIEW


def mac_op(op: GraphOp) -> bool:
    """Whether an op's MACs run on the NPU's MAC array and in the CPU's int8 matrix kernels (conv2d, linear,
    matmul)."""
    return mac_class(op) is not None


def _elements(graph: CompiledGraph, tensors: list[str]) -> int:
    return sum(math.prod(graph.tensors[t].shape) for t in tensors)


def fused_into_producer(op: GraphOp, graph: CompiledGraph) -> bool:
    """Whether ``op`` runs in kernel calls of an op making one of its inputs (a ReLU or residual add TVM fused into
    a convolution's epilogue, a flatten into a pool's requantization)."""
    if not op.calls:
        return False
    producers = [graph.op(p) for p in (graph.tensors[t].producer for t in op.inputs) if p is not None]
    return any(p.region == op.region and set(op.calls) <= set(p.calls) for p in producers)


def cpu_work(op: GraphOp, graph: CompiledGraph, dot: DotProduct) -> list[float]:
    """An integer op's compute on a CPU whose kernels use ``dot``, in the units of :data:`CPU_RATES`: a MAC
    kernel's MACs under its class, the output elements it requantizes and the input elements it packs, over the
    share of vector lanes it fills (:func:`lane_occupancy`); the output elements an op fused into its producer's
    kernel requantizes (a residual add); nothing for other ops, whose cost is the bytes they move."""
    if mac_op(op):
        macs = [op.macs if mac_class(op) == name else 0 for name in MAC_CLASSES]
        occupancy = lane_occupancy(op, dot)
        return [amount / occupancy for amount in [*macs, _elements(graph, op.outputs), _elements(graph, op.inputs)]]
    rescales = op.requantization is not None and op.requantization.table is None
    outputs = _elements(graph, op.outputs) if rescales and fused_into_producer(op, graph) else 0
    return [0.0] * len(MAC_CLASSES) + [outputs, 0.0]


def memory_priced(op: GraphOp) -> bool:
    """Whether a CPU op's kernel is costed by the bytes it moves (``memory_bytes_per_s``, which calibration fits on
    these kernels only): every op but the integer conv2d, linear and matmul, whose rates already price what they
    pack and write. Those stream far faster than the others: as a bound, ``memory_bytes_per_s`` made mobilenet_v2's
    1x1 convolutions 15x too slow on AVX-512."""
    return not mac_op(op) or op.placement == FLOAT_PLACEMENT


def moves_blocked_tensors(op: GraphOp) -> bool:
    """Whether an op's kernel is the layout plan's copy with blocked tensors (a max pool between convolutions: a
    block's channels per vector)."""
    return op.kernel is not None and is_blocked(op.kernel)


def memory_rate(op: GraphOp, cpu: CpuFigures) -> float:
    """The bytes per second a :func:`memory_priced` op's kernel moves: ``blocked_memory_bytes_per_s`` where it
    :func:`moves_blocked_tensors`, else ``memory_bytes_per_s``."""
    return cpu.blocked_memory_bytes_per_s if moves_blocked_tensors(op) else cpu.memory_bytes_per_s


def lane_occupancy(op: GraphOp, dot: DotProduct) -> float:
    """Share of its CPU kernel's vector lanes a layer fills with ``dot``.

    Dense convolutions and linear layers compute ``dot.lanes`` output channels at once, each summing ``dot.depth``
    input channels per instruction; depthwise convolutions ``dot.depthwise_lanes`` channels at once, with the
    CPU's depthwise dot product 4 taps of a row at once. Channel counts (and taps) that are not multiples of these
    are padded with zeros, which cost as much as real ones: a 3-channel stem on 2-deep AVX2 products fills 3/4 of
    them, a 3x3 depthwise kernel on 4-tap products 3/4. A grouped convolution's block of output channels sums
    over the window of input channels its groups read, zeros outside each lane's group
    (:func:`edgeq.compile.kernels.window_blocks`): 8 channels a group on 16 lanes fill half. 1 for other ops.
    """
    attributes = op.attributes
    kind = mac_class(op)
    if kind in ("conv2d", "pointwise") and isinstance(attributes, Conv2dAttrs):
        out_channels, groups = attributes.out_channels, attributes.groups
        in_per_group = attributes.in_channels // groups
        window = kernels.window_blocks(out_channels, in_per_group, groups, dot.lanes, dot.depth) * dot.depth
        return _filled(out_channels, dot.lanes) * in_per_group / window
    if kind == "depthwise" and isinstance(attributes, Conv2dAttrs):
        filled = _filled(attributes.out_channels, dot.depthwise_lanes)
        if kernels.depthwise_dot_product(dot, attributes.dilation):
            filled *= _filled(attributes.kernel[1], kernels.DEPTHWISE_TAPS)
        return filled
    if isinstance(attributes, LinearAttrs):
        return _filled(attributes.out_channels, dot.lanes) * _filled(attributes.in_features, dot.depth)
    return 1.0


def _filled(channels: int, block: int) -> float:
    return channels / _ceil_to(channels, block)


def _ceil_to(value: int, step: int) -> int:
    return -(-value // step) * step


def mac_utilisation(op: GraphOp, hardware: Hardware, alignment: int) -> float:
    """Share of the MAC array a conv2d or linear layer keeps busy.

    The array computes ``alignment`` output channels at once, each over ``int8_macs_per_cycle / alignment``
    products of its reduction (input channels per group x kernel window, or input features); a layer whose
    output channels or reduction depth are not multiples of these leaves the rest idle.
    """
    attributes = op.attributes
    if isinstance(attributes, Conv2dAttrs):
        outputs = attributes.out_channels
        depth = attributes.in_channels // attributes.groups * math.prod(attributes.kernel)
        if attributes.groups > 1:  # each group has its own reduction: one channel of the array per group
            outputs = attributes.groups
    elif isinstance(attributes, LinearAttrs):
        outputs, depth = attributes.out_channels, attributes.in_features
    else:
        return 1.0
    lanes = max(hardware.int8_macs_per_cycle // alignment, 1)
    return (outputs / _ceil_to(outputs, alignment)) * (depth / _ceil_to(depth, lanes))


def spill_bytes(activation_bytes: int, weight_bytes: int, sram_bytes: int) -> int:
    """Extra DRAM traffic of a layer whose working set does not fit the SRAM.

    Fits: none. Else the activations stream through DRAM in tiles (their bytes once more); when the weights also
    exceed half the SRAM they are fetched again for every tile of half the SRAM.
    """
    if activation_bytes + weight_bytes <= sram_bytes:
        return 0
    if weight_bytes <= sram_bytes // 2:
        return activation_bytes
    tiles = math.ceil(activation_bytes / (sram_bytes // 2))
    return activation_bytes + weight_bytes * (tiles - 1)


def host_dot_product(graph: CompiledGraph, target: Target) -> DotProduct:
    """The dot product of the CPU that runs ``graph``'s CPU layers on ``target`` (its host, for an NPU target): the
    build's, unless the library was built for another architecture (a simulation on this machine)."""
    host = host_cpu(target)
    if graph.arch == host.llvm.arch:
        return DOT_PRODUCTS[graph.dot_product]
    return kernels_dot_product(host)


class _Estimator:
    def __init__(self, graph: CompiledGraph, target: Target, cpu: CpuFigures | None) -> None:
        self.graph = graph
        self.target = target
        self.cpu = cpu
        self.dot = host_dot_product(graph, target) if target.firmware_host is None else None
        self.computing_ops = frozenset(op.name for op in graph.ops if op.placement == "NPU" and not view_op(op))
        self.borders = frozenset(t for region in graph.regions for t in [*region.inputs, *region.outputs])
        self.previous_npu: tuple[str | None, float] = (None, 0.0)
        """The region of the NPU command run last and the cycles it left the DMA free (block model: the DMA brings
        the next layer's weights while it runs)."""

    def layer(self, op: GraphOp) -> LayerEstimate:
        if op.placement == "NPU":
            return self._npu(op)
        return self._cpu(op)

    def _estimate(self, op: GraphOp, fused: bool, compute: float, memory: float, overhead: float, **figures: float) -> LayerEstimate:
        latency = overhead + max(compute, memory)
        if fused:
            bound = "fused"
        elif (op.kernel is None and op.placement != "NPU") or (view_op(op) and op.placement == "NPU"):
            bound = "none"
        elif overhead >= max(compute, memory):
            bound = "overhead"
        else:
            bound = "compute" if compute >= memory else "memory"
        return LayerEstimate(
            op=op,
            fused=fused,
            spill_bytes=int(figures.get("spill", 0)),
            dram_bytes=int(figures["dram"]),
            onchip_bytes=int(figures.get("onchip", 0)),
            utilisation=figures.get("utilisation", 1.0),
            compute_ms=compute * MS,
            memory_ms=memory * MS,
            overhead_ms=overhead * MS,
            latency_ms=latency * MS,
            bound=bound,
        )

    def _npu(self, op: GraphOp) -> LayerEstimate:
        hardware = self.target.hardware
        if view_op(op):  # the NPU reads the same bytes with another shape
            return self._estimate(op, False, 0.0, 0.0, 0.0, dram=0)
        if hardware.micro_block is not None:
            return self._npu_blocks(op, hardware)
        fused = fused_into_producer(op, self.graph)
        if mac_op(op):
            alignment = getattr(self.target.npu.limits(op.op), "channel_alignment", 1)
            utilisation = mac_utilisation(op, hardware, alignment)
            compute = op.macs / (hardware.int8_macs_per_cycle * utilisation * hardware.clock_hz)
        else:
            utilisation = 1.0
            compute = (op.macs + op.non_mac_ops) / (hardware.vector_ops_per_cycle * hardware.clock_hz)
        activations = 0 if fused else op.bytes_in + op.bytes_out
        spill = spill_bytes(activations, op.weight_bytes, hardware.sram_bytes)
        border = sum(self.graph.tensors[t].bytes for t in [*op.inputs, *op.outputs] if t in self.borders)
        dram = op.weight_bytes + border + spill
        overhead = 0.0 if fused else hardware.layer_overhead_cycles / hardware.clock_hz
        return self._estimate(
            op,
            fused,
            compute,
            dram / hardware.dram_bandwidth_bytes_per_s,
            overhead,
            spill=spill,
            dram=dram,
            onchip=min(activations + op.weight_bytes, hardware.sram_bytes),
            utilisation=utilisation,
        )

    def _npu_blocks(self, op: GraphOp, hardware: Hardware) -> LayerEstimate:
        """An NPU layer on a block-model NPU: compute by blocks (:mod:`.npu_blocks`), memory as the busier of the
        SRAM and the DRAM (:mod:`.npu_memory`)."""
        chained = hardware.chains_elementwise and chained_elementwise(op, self.graph, self.computing_ops)
        if chained or fused_activation(op, self.graph, self.computing_ops):
            return self._estimate(op, True, 0.0, 0.0, 0.0, dram=0)
        if op.op in hardware.sliced_views:  # the NPU reads the outputs as slices of the input
            return self._estimate(op, False, 0.0, 0.0, 0.0, dram=0)
        cost = block_cost(self.graph, op, hardware, mac_op(op), fused_lookup_table(op, self.graph, self.computing_ops))
        traffic = layer_traffic(self.graph, op, hardware, input_reads(op, hardware, mac_op(op)), self.borders)
        array_path = mac_op(op) or op.op in WINDOW_OPS or op.op in hardware.pooled_copies
        edges = block_latency_cycles(self.graph, op, hardware, cost.blocks, self.borders) if array_path else 0.0
        region, previous = self.previous_npu
        weights = weight_dma(self.graph, op, hardware, previous if region == op.region else None)
        working_set = op.bytes_in + op.bytes_out + op.weight_bytes
        estimated = self._estimate(
            op,
            False,
            (cost.compute_cycles + edges + weights.wait) / hardware.clock_hz,
            traffic.seconds(hardware),
            hardware.layer_overhead_cycles / hardware.clock_hz,
            spill=0 if traffic.in_sram else traffic.dram_bytes - op.weight_bytes,
            dram=traffic.dram_bytes,
            onchip=min(working_set, hardware.sram_bytes),
            utilisation=cost.utilisation,
        )
        commands = len(op.inputs) if op.op in hardware.pooled_copies else 1  # a concat: a copy command per input
        free = max(0.0, estimated.latency_ms / MS * hardware.clock_hz - weights.wait - weights.during)
        self.previous_npu = (op.region, free / commands)
        return estimated

    def _cpu(self, op: GraphOp) -> LayerEstimate:
        if self.cpu is None or self.dot is None:
            raise EdgeqError(f"op '{op.name}' runs on {self.target.name}'s {self.target.firmware_host}, whose speed edgeq does not model; {HOST_CODE_ADVICE}")
        fused = fused_into_producer(op, self.graph)
        if op.kernel is None:  # a view: no kernel, no cost
            return self._estimate(op, fused, 0.0, 0.0, 0.0, dram=0)
        moved = 0 if fused else op.bytes_in + op.bytes_out + op.weight_bytes
        if op.placement == FLOAT_PLACEMENT:
            utilisation, compute = 1.0, op.macs / self.cpu.float32_macs_per_s
        else:
            utilisation = lane_occupancy(op, self.dot)
            compute = sum(amount / getattr(self.cpu, rate) for amount, rate in zip(cpu_work(op, self.graph, self.dot), CPU_RATES))
        share = 1 if op.parallel else self.cpu.parallel_speedup  # the rates are for kernels on all cores
        memory = moved / memory_rate(op, self.cpu) if memory_priced(op) else 0.0
        fixed = self.cpu.kernel_overhead_ns + mac_op(op) * self.cpu.mac_kernel_overhead_ns + op.parallel * self.cpu.parallel_overhead_ns
        overhead = 0.0 if fused else fixed * 1e-9
        return self._estimate(op, fused, share * compute, share * memory, overhead, dram=moved, utilisation=utilisation)

    def transitions(self) -> list[TransitionEstimate]:
        if self.target.kind is not TargetKind.NPU:
            return []
        hardware = self.target.hardware
        found = []
        regions = self.graph.regions
        for before, after in zip(regions, regions[1:]):
            if before.placement == after.placement:
                continue
            crossing = [t for t in after.inputs if self.graph.tensors[t].producer in before.ops or t in self.graph.inputs]
            size = sum(self.graph.tensors[t].bytes for t in crossing)
            seconds = hardware.transition_overhead_ns * 1e-9 + size / hardware.dram_bandwidth_bytes_per_s
            found.append(TransitionEstimate(before.name, after.name, crossing, size, seconds * MS))
        return found


def estimate(graph: CompiledGraph, target: Target, cpu: CpuFigures | None, cpu_source: str, source: str) -> PerfResult:
    """Cost every op and transition of ``graph`` on ``target`` (its host CPU at ``cpu``; None for a target whose host
    runs the user's firmware, where every op is on the NPU)."""
    estimator = _Estimator(graph, target, cpu)
    layers = [estimator.layer(op) for op in graph.ops]
    transitions = estimator.transitions()
    npu_ms = sum(layer.latency_ms for layer in layers if layer.op.placement == "NPU")
    cpu_ms = sum(layer.latency_ms for layer in layers if layer.op.placement != "NPU")
    transition_ms = sum(t.latency_ms for t in transitions)
    invocation_ms = cpu.invocation_overhead_ns * 1e-9 * MS if cpu is not None else 0.0
    latency_ms = npu_ms + cpu_ms + transition_ms + invocation_ms
    first_input = graph.tensors[graph.inputs[0]] if graph.inputs else None
    batch = first_input.shape[0] if first_input is not None and first_input.shape and first_input.shape[0] > 0 else 1
    macs = sum(op.macs for op in graph.ops)
    hardware = target.hardware
    peak_macs_per_s = hardware.int8_macs_per_cycle * hardware.clock_hz if hardware is not None else cpu.conv2d_int8_macs_per_s
    bounds = [layer.bound for layer in layers]
    summary = PerfSummary(
        latency_ms=latency_ms,
        fps=batch / (latency_ms / MS) if latency_ms > 0 else math.inf,
        batch=batch,
        macs=macs,
        dram_bytes_per_frame=(sum(layer.dram_bytes for layer in layers) + sum(t.bytes for t in transitions)) / batch,
        weight_bytes=sum(op.weight_bytes for op in graph.ops),
        peak_onchip_bytes=max((layer.onchip_bytes for layer in layers), default=0),
        mac_utilisation=macs / (latency_ms / MS * peak_macs_per_s) if latency_ms > 0 else 0.0,
        npu_ms=npu_ms,
        cpu_ms=cpu_ms,
        transition_ms=transition_ms,
        invocation_ms=invocation_ms,
        compute_bound=bounds.count("compute"),
        memory_bound=bounds.count("memory"),
        overhead_bound=bounds.count("overhead"),
    )
    figures = {
        "npu": hardware.model_dump() if hardware is not None else None,
        "cpu": cpu.model_dump() if cpu is not None else None,
        "cpu_source": cpu_source,
    }
    return PerfResult(source, target.name, figures, summary, layers, transitions, graph)
