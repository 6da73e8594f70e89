"""edgeq's estimate of an Ethos-U model beside Vela's: Vela's per-layer cycles summed per op of edgeq's graph
(through the TOSA writer's operator map), both sides grouped as Vela fuses them, the total error and the rank
correlation of the groups (docs/perf.md, "Against Vela").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edgeq.compile.compiled_graph import CompiledGraph
from edgeq.compile.vela import VelaLayer, VelaResult, compile_tosa
from edgeq.errors import EdgeqError
from edgeq.export.onnx_reader import QDQModel
from edgeq.export.tosa.writer import build_tosa
from edgeq.perf.result import PerfResult
from edgeq.targets import Target

MS = 1e3


@dataclass(frozen=True)
class OpGroup:
    """Ops of one NPU region Vela runs as one layer (an activation in its producer's output stage), with edgeq's
    estimate and Vela's, in milliseconds."""

    ops: tuple[str, ...]
    estimated_ms: float
    vela_ms: float


@dataclass(frozen=True)
class VelaComparison:
    """edgeq's estimate of the NPU regions against Vela's: totals, the error ``estimated / vela - 1``, Spearman's
    rank correlation over the groups either side costs, and the groups."""

    estimated_ms: float
    vela_ms: float
    error: float
    spearman: float
    groups: tuple[OpGroup, ...]


def vela_regions(qdq: QDQModel, graph: CompiledGraph, target: Target) -> dict[str, VelaResult]:
    """Vela's result for each NPU region of ``graph`` (compiled from ``qdq`` for ``target``): the region's ops
    written as TOSA and compiled by the Vela driver.

    Raises:
        EdgeqError: a target without ``[vela]`` options; CompileError / ExportError as the driver and writer raise.
    """
    if target.vela is None:
        raise EdgeqError(f"{target.name} has no [vela] section: Vela compiles for the Ethos-U targets only")
    return {
        region.name: compile_tosa(build_tosa(qdq, region.ops), target.vela, region.name)
        for region in graph.regions
        if region.placement == "NPU"
    }


def cycles_per_op(layers: Sequence[VelaLayer]) -> dict[str, int]:
    """Vela's cycles of each op of edgeq's graph: the layers it wrote, summed (layers of no op left out)."""
    found: dict[str, int] = {}
    for layer in layers:
        if layer.op is not None:
            found[layer.op] = found.get(layer.op, 0) + layer.cycles
    return found


def _groups(graph: CompiledGraph, vela_ms: Mapping[str, float], estimated: Mapping[str, float]) -> list[list[str]]:
    """The NPU ops (``estimated``'s, in call order) in groups: an op Vela gives no cycles joins the op reading its
    output (Vela names a fused layer after its last op); one edgeq gives none joins the op making its input (an
    activation in its producer's output stage); both within one region."""
    parent = {name: name for name in estimated}

    def root(name: str) -> str:
        while parent[name] != name:
            name = parent[name]
        return name

    for name in estimated:
        op = graph.op(name)
        neighbours: list[str] = []
        if not vela_ms.get(name):
            neighbours = [c for t in op.outputs for c in graph.tensors[t].consumers]
        if not neighbours and not estimated[name]:
            neighbours = [p for t in op.inputs if (p := graph.tensors[t].producer) is not None]
        if len(neighbours) == 1 and neighbours[0] in parent and graph.op(neighbours[0]).region == op.region:
            parent[root(name)] = root(neighbours[0])
    groups: dict[str, list[str]] = {}
    for name in estimated:
        groups.setdefault(root(name), []).append(name)
    return list(groups.values())


def compare(result: PerfResult, vela: Mapping[str, VelaResult]) -> VelaComparison:
    """Compare ``result``'s NPU layers with Vela's results for the regions they are in (``vela``: by region name)."""
    hz = {region: compiled.summary.clock_hz for region, compiled in vela.items()}
    vela_ms: dict[str, float] = {}
    for region, compiled in vela.items():
        for op, cycles in cycles_per_op(compiled.layers).items():
            vela_ms[op] = vela_ms.get(op, 0.0) + cycles / hz[region] * MS
    estimated = {layer.op.name: layer.latency_ms for layer in result.layers if layer.op.region in vela}
    groups = [
        OpGroup(tuple(ops), sum(estimated[o] for o in ops), sum(vela_ms.get(o, 0.0) for o in ops))
        for ops in _groups(result.graph, vela_ms, estimated)
    ]
    costed = [g for g in groups if g.estimated_ms > 0 or g.vela_ms > 0]
    total_estimated = sum(estimated.values())
    total_vela = sum(compiled.summary.inference_time_s * MS for compiled in vela.values())
    rho = spearman([g.estimated_ms for g in costed], [g.vela_ms for g in costed]) if len(costed) > 1 else 1.0
    return VelaComparison(total_estimated, total_vela, total_estimated / total_vela - 1, rho, tuple(costed))


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the values' ranks, ties sharing their average rank."""
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def _ranks(values: Sequence[float]) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    for value in set(values):  # ties share their average rank
        tied = np.asarray(values) == value
        ranks[tied] = ranks[tied].mean()
    return ranks
