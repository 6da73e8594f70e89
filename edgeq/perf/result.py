"""What the performance estimator returns: per-layer estimates, NPU<->CPU transitions and a summary.

:meth:`PerfResult.to_dict` is ``report.json``; the HTML report renders the same object. Times are in
milliseconds, sizes in bytes; docs/perf.md gives the formula of every field.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from edgeq.compile.compiled_graph import CompiledGraph, GraphOp
from edgeq.fileio import atomic_write
from edgeq.perf.vela_compare import VelaComparison

REPORT_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class LayerEstimate:
    """One op of the compiled graph, costed: the op, and what the estimator adds to it.

    Attributes:
        op: the compiled graph's op (its name, kind, placement, region, kernel, MACs and other operations, bytes).
        fused: the op runs inside the kernel of the op that makes its input (no call, no memory traffic of its own).
        spill_bytes: NPU only: extra DRAM traffic because the working set exceeds the SRAM.
        dram_bytes: bytes moved between DRAM and the processor (NPU: weights, region borders and spills; CPU:
            activations and weights, unless fused).
        onchip_bytes: NPU only: SRAM the layer occupies (its working set, at most the SRAM).
        utilisation: share of the NPU's MAC array the layer's shape keeps busy (channel alignment); on a CPU, the
            share of its register tiles a dense convolution fills (1 for other ops).
        compute_ms, memory_ms, overhead_ms: compute time, memory time, fixed cost per layer.
        latency_ms: ``overhead + max(compute, memory)``.
        bound: ``compute``, ``memory``, ``overhead`` (the fixed cost dominates), ``fused`` or ``none`` (no kernel).
    """

    op: GraphOp
    fused: bool
    spill_bytes: int
    dram_bytes: int
    onchip_bytes: int
    utilisation: float
    compute_ms: float
    memory_ms: float
    overhead_ms: float
    latency_ms: float
    bound: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the layer as ``report.json`` holds it, the op's figures first (``ops``: its operations that
        are not MACs)."""
        op = self.op
        estimated = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("op", "fused")}
        return {
            "name": op.name,
            "op": op.op,
            "placement": op.placement,
            "region": op.region,
            "kernel": op.kernel,
            "parallel": op.parallel,
            "fused": self.fused,
            "macs": op.macs,
            "ops": op.non_mac_ops,
            "weight_bytes": op.weight_bytes,
            "bytes_in": op.bytes_in,
            "bytes_out": op.bytes_out,
            **estimated,
        }


@dataclass(frozen=True)
class TransitionEstimate:
    """A switch between the NPU and its host CPU: the border tensors handed over, and its cost
    (``transition_overhead_ns`` plus the tensors' bytes at DRAM bandwidth)."""

    from_region: str
    to_region: str
    tensors: list[str]
    bytes: int
    latency_ms: float


@dataclass(frozen=True)
class PerfSummary:
    """Totals per inference of the compiled batch (and per frame where named so).

    Attributes:
        latency_ms: sum of the layers' and transitions' latencies and the invocation.
        fps: frames per second: ``batch / latency``.
        batch: frames per inference (the first dimension of the first input).
        macs: total multiply-accumulates.
        dram_bytes_per_frame: DRAM traffic of layers and transitions, divided by the batch.
        weight_bytes: weights and biases of every layer.
        peak_onchip_bytes: the largest NPU layer working set held in SRAM (0 on a CPU target).
        mac_utilisation: ``macs / (latency x peak MAC rate)``; the peak is the NPU's MAC array, or on a CPU
            target the CPU's dense convolution rate.
        npu_ms, cpu_ms, transition_ms: the latency split by where it is spent.
        invocation_ms: the runtime's fixed cost of one inference besides its layers (calling the model).
        compute_bound, memory_bound, overhead_bound: how many layers are bound by each.
    """

    latency_ms: float
    fps: float
    batch: int
    macs: int
    dram_bytes_per_frame: float
    weight_bytes: int
    peak_onchip_bytes: int
    mac_utilisation: float
    npu_ms: float
    cpu_ms: float
    transition_ms: float
    invocation_ms: float
    compute_bound: int
    memory_bound: int
    overhead_bound: int


@dataclass(frozen=True)
class PerfResult:
    """The estimate of one compiled model on one target (what ``edgeq.perf_model`` returns).

    Attributes:
        source: what was estimated (the artifact, or the model compiled for it).
        target: the target's name.
        figures: the figures used: ``npu`` (the target's ``[hardware]``, or None), ``cpu`` (the host CPU's
            figures) and ``cpu_source`` (measured on this machine, or nominal).
        summary: totals.
        layers: one estimate per op of the compiled graph, in call order.
        transitions: every NPU<->CPU switch, in call order.
        graph: the compiled graph the estimate is made from (not part of ``to_dict``: ``graph.json``).
        report_json: where ``report.json`` was written (None when not written).
        report_html: where ``report.html`` was written (None when not written).
        vela: on an Ethos-U target, Vela's estimate of the NPU regions beside edgeq's (per layer, per op group and
            in total; ``figures["vela_source"]`` says where it comes from), else None.
        accuracy: per-layer accuracy (:class:`edgeq.report.LayerAccuracy`, in the integer graph's order) when
            ``perf_model`` was given the float model, else None.
    """

    source: str
    target: str
    figures: dict[str, Any]
    summary: PerfSummary
    layers: list[LayerEstimate]
    transitions: list[TransitionEstimate]
    graph: CompiledGraph = field(repr=False, compare=False)
    report_json: Path | None = None
    report_html: Path | None = None
    accuracy: list[Any] | None = field(default=None, repr=False, compare=False)
    vela: VelaComparison | None = None

    def to_dict(self, layer_details: bool = True) -> dict[str, Any]:
        """``report.json``: schema version, source, target, figures, summary, transitions and (with
        ``layer_details``) the layers."""
        data: dict[str, Any] = {
            "schema_version": REPORT_SCHEMA_VERSION,
            "source": self.source,
            "target": self.target,
            "figures": self.figures,
            "summary": asdict(self.summary),
            "transitions": [asdict(t) for t in self.transitions],
        }
        if layer_details:
            data["layers"] = [layer.to_dict() for layer in self.layers]
        if self.vela is not None:
            data["vela"] = self.vela.to_dict()
        return data

    def write_json(self, path: str | Path, layer_details: bool = True) -> Path:
        """Write :meth:`to_dict` to ``path`` (atomically)."""
        with atomic_write(path) as temporary:
            Path(temporary).write_text(json.dumps(self.to_dict(layer_details), indent=2) + "\n", encoding="utf-8")
        return Path(path)
