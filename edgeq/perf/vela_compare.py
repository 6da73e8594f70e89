"""edgeq's estimate of an Ethos-U model beside Vela's: Vela's per-layer cycles summed per op of edgeq's graph
(through the TOSA writer's operator map), both sides grouped as Vela fuses them, the total error and the rank
correlation of the groups (docs/perf.md, "Against Vela").
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeq.compile.artifact import MANIFEST
from edgeq.compile.compiled_graph import CompiledGraph, CompiledGraphError
from edgeq.compile.vela import VelaLayer, VelaSummary
from edgeq_runtime.manifest import COMMAND_STREAMS_KEY

if TYPE_CHECKING:
    from edgeq.perf.result import PerfResult

MS = 1e3


@dataclass(frozen=True)
class VelaRegion:
    """Vela's estimate of one NPU region: its per-layer table (each layer with the op of edgeq's graph that wrote
    it) and its summary (cycles, inference time at the clock, SRAM / DRAM / flash used), from Vela ``version``."""

    region: str
    version: str
    layers: tuple[VelaLayer, ...]
    summary: VelaSummary


@dataclass(frozen=True)
class VelaCycles:
    """Vela's cycles of some layers: in all (``cycles``, at the clock ``time_ms``), the NPU's own, and the memory
    access cycles of the SRAM, the DRAM and flash (on and off chip), summed over the layers."""

    cycles: int = 0
    npu_cycles: int = 0
    sram_access_cycles: int = 0
    dram_access_cycles: int = 0
    flash_access_cycles: int = 0
    time_ms: float = 0.0

    def plus(self, layer: VelaLayer, clock_hz: float) -> VelaCycles:
        """These cycles and ``layer``'s."""
        return VelaCycles(
            self.cycles + layer.cycles,
            self.npu_cycles + layer.npu_cycles,
            self.sram_access_cycles + layer.sram_access_cycles,
            self.dram_access_cycles + layer.dram_access_cycles,
            self.flash_access_cycles + layer.on_chip_flash_access_cycles + layer.off_chip_flash_access_cycles,
            self.time_ms + layer.cycles / clock_hz * MS,
        )

    def __add__(self, other: VelaCycles) -> VelaCycles:
        return VelaCycles(*(getattr(self, f) + getattr(other, f) for f in self.__dataclass_fields__))


@dataclass(frozen=True)
class OpGroup:
    """Ops of one NPU region Vela runs as one layer (an activation in its producer's output stage), with edgeq's
    estimate (milliseconds) and Vela's."""

    ops: tuple[str, ...]
    estimated_ms: float
    vela: VelaCycles

    @property
    def vela_ms(self) -> float:
        return self.vela.time_ms


@dataclass(frozen=True)
class VelaComparison:
    """edgeq's estimate of the NPU regions against Vela's: totals, the error ``estimated / vela - 1``, Spearman's
    rank correlation over the groups either side costs, the groups, and Vela's regions."""

    estimated_ms: float
    vela_ms: float
    error: float
    spearman: float
    groups: tuple[OpGroup, ...]
    regions: tuple[VelaRegion, ...]

    def to_dict(self) -> dict[str, Any]:
        """``report.json``'s ``vela``: totals, error, Spearman, each region's summary and layers, the groups."""
        return {
            "estimated_ms": self.estimated_ms,
            "vela_ms": self.vela_ms,
            "error": self.error,
            "spearman": self.spearman,
            "regions": [asdict(region) for region in self.regions],
            "groups": [asdict(group) for group in self.groups],
        }



def artifact_vela_regions(path: str | Path) -> dict[str, VelaRegion] | None:
    """Vela's estimate of each NPU region an artifact stores (compile keeps it beside the command stream), or None
    for an artifact that stores none (built before command streams were kept, or for a target without Vela).

    Raises:
        CompiledGraphError: an estimate member that is missing or cannot be read.
    """
    with zipfile.ZipFile(path) as archive:
        streams = json.loads(archive.read(MANIFEST)).get(COMMAND_STREAMS_KEY)
        if not streams:
            return None
        found = {}
        for stream in streams:
            try:
                data = json.loads(archive.read(stream["estimate"]))
                layers = tuple(VelaLayer(**layer) for layer in data["layers"])
                found[stream["region"]] = VelaRegion(stream["region"], data["vela_version"], layers, VelaSummary(**data["summary"]))
            except (KeyError, TypeError, ValueError) as error:
                what = stream.get("region", "an NPU region")
                raise CompiledGraphError(f"{path}: Vela's estimate of {what} cannot be read ({error}); compile the model again") from None
    return found


def cycles_per_op(region: VelaRegion) -> dict[str, VelaCycles]:
    """Vela's cycles of each op of edgeq's graph in a region: the layers it wrote, summed (layers of no op left
    out)."""
    found: dict[str, VelaCycles] = {}
    for layer in region.layers:
        if layer.op is not None:
            found[layer.op] = found.get(layer.op, VelaCycles()).plus(layer, region.summary.clock_hz)
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


def compare(result: PerfResult, vela: Mapping[str, VelaRegion]) -> VelaComparison:
    """Compare ``result``'s NPU layers with Vela's estimates of the regions they are in (``vela``: by region)."""
    per_op = {op: cycles for region in vela.values() for op, cycles in cycles_per_op(region).items()}
    estimated = {layer.op.name: layer.latency_ms for layer in result.layers if layer.op.region in vela}
    groups = [
        OpGroup(tuple(ops), sum(estimated[o] for o in ops), sum((per_op.get(o, VelaCycles()) for o in ops), VelaCycles()))
        for ops in _groups(result.graph, {op: c.time_ms for op, c in per_op.items()}, estimated)
    ]
    costed = tuple(g for g in groups if g.estimated_ms > 0 or g.vela_ms > 0)
    total_estimated = sum(estimated.values())
    total_vela = sum(region.summary.inference_time_s * MS for region in vela.values())
    rho = spearman([g.estimated_ms for g in costed], [g.vela_ms for g in costed]) if len(costed) > 1 else 1.0
    error = total_estimated / total_vela - 1 if total_vela > 0 else 0.0
    return VelaComparison(total_estimated, total_vela, error, rho, costed, tuple(vela.values()))


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
