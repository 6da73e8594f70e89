"""The NPU regions of an Arm Ethos-U build: each one written as a TOSA graph (the TOSA writer, for that run of ops)
and compiled by Vela (:mod:`.vela`) into its command stream; the artifact members and manifest entries that hold
them (docs/artifact.md, ``npu_command_streams``).

The command stream needs the Ethos-U itself (no simulator of it installs here): the runtimes run the region's
bit-exact simulation, compiled into the host library like every NPU region's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from edgeq.check.report import Placement
from edgeq.compile.artifact import json_bytes
from edgeq.compile.partition import Partition, Region
from edgeq.compile.vela import VelaRefusal, VelaResult, compile_tosa
from edgeq.errors import CompileError, ExportError
from edgeq.export.onnx_reader import QDQModel
from edgeq.export.tosa.writer import TosaGraph, build_tosa
from edgeq.targets import Target
from edgeq_runtime.manifest import COMMAND_STREAMS_KEY
from edgeq_runtime.model import command_stream_note


@dataclass(frozen=True)
class RegionCommandStream:
    """One NPU region compiled by Vela: its name, its ops (the QDQ graph's node names), its TOSA graph and Vela's
    result."""

    region: str
    ops: tuple[str, ...]
    tosa: TosaGraph
    vela: VelaResult

    def members(self) -> dict[str, bytes]:
        """The artifact members of this region, by name: the TOSA file, the command stream, its encoded weights,
        and Vela's estimate with the driver's layout (``<region>.vela.json``)."""
        names = self.member_names()
        stream = self.vela.command_stream
        return {
            names["tosa"]: self.tosa.flatbuffer,
            names["command_stream"]: stream.commands,
            names["weights"]: stream.weights,
            names["estimate"]: json_bytes(self.estimate()),
        }

    def member_names(self) -> dict[str, str]:
        return {
            "tosa": f"{self.region}.tosa",
            "command_stream": f"{self.region}.cmd",
            "weights": f"{self.region}.weights",
            "estimate": f"{self.region}.vela.json",
        }

    def estimate(self) -> dict[str, Any]:
        """Vela's per-layer estimate and summary, and the command stream's layout a driver needs (the memory
        region and offset of each input and output, the scratch areas)."""
        stream = asdict(self.vela.command_stream)
        for raw in ("commands", "weights", "raw"):
            del stream[raw]
        return {
            "region": self.region,
            "vela_version": self.vela.version,
            "options": list(self.vela.options),
            "layout": stream,
            "layers": [asdict(layer) for layer in self.vela.layers],
            "summary": asdict(self.vela.summary),
        }

    def manifest_entry(self) -> dict[str, Any]:
        """The region's entry in the manifest's ``npu_command_streams``."""
        summary, stream = self.vela.summary, self.vela.command_stream
        return {
            "region": self.region,
            "compiler": "vela",
            "compiler_version": self.vela.version,
            "options": list(self.vela.options),
            "ops": list(self.ops),
            **self.member_names(),
            "memory": {
                "sram_bytes": summary.sram_bytes,
                "dram_bytes": summary.dram_bytes,
                "on_chip_flash_bytes": summary.on_chip_flash_bytes,
                "off_chip_flash_bytes": summary.off_chip_flash_bytes,
                "scratch_bytes": stream.scratch_bytes,
                "fast_scratch_bytes": stream.fast_scratch_bytes,
                "weight_bytes": len(stream.weights),
                "command_stream_bytes": len(stream.commands),
            },
        }


def compile_vela_regions(qdq: QDQModel, parts: Partition, target: Target, report_progress: Callable[[str], None]) -> list[RegionCommandStream]:
    """Every NPU region of ``parts`` as a TOSA graph compiled by Vela with ``target``'s ``[vela]`` options (none for
    a target without them).

    Raises:
        CompileError: a region the TOSA writer cannot write, or one Vela refuses, naming the region, the op and the
            reason.
    """
    if target.vela is None:
        return []
    compiled = []
    for region in (r for r in parts.regions if r.placement is Placement.NPU):
        report_progress(f"vela: {region.name} ({len(region.nodes)} ops) for {target.vela.accelerator_config}")
        graph = _tosa(qdq, region, region.nodes)
        try:
            result = compile_tosa(graph, target.vela, region.name)
        except VelaRefusal as refusal:
            raise _localized(qdq, region, target, refusal) from None
        compiled.append(RegionCommandStream(region.name, tuple(region.nodes), graph, result))
    return compiled


def _tosa(qdq: QDQModel, region: Region, ops: list[str]) -> TosaGraph:
    try:
        return build_tosa(qdq, ops)
    except ExportError as error:
        raise CompileError(f"{region.name}: no TOSA graph for Vela: {error}") from None


def _localized(qdq: QDQModel, region: Region, target: Target, refusal: VelaRefusal) -> CompileError:
    """The refusal naming one op: when several ops wrote an operator of the kind Vela names, the first of them
    Vela refuses alone (the refusal as it is when each compiles alone)."""
    assert target.vela is not None
    if len(refusal.ops) > 1:
        for op in refusal.ops:
            try:
                compile_tosa(_tosa(qdq, region, [op]), target.vela, region.name)
            except VelaRefusal as alone:
                return CompileError(f"{region.name}: Vela refuses op '{op}' ({refusal.operator}): {alone.reason}")
    return CompileError(str(refusal))


def command_stream_manifest(streams: list[RegionCommandStream]) -> dict[str, Any]:
    """The manifest's ``npu_command_streams`` (nothing for a build without them)."""
    return {COMMAND_STREAMS_KEY: [s.manifest_entry() for s in streams]} if streams else {}


def command_stream_members(streams: list[RegionCommandStream]) -> dict[str, bytes]:
    """The artifact members of every region."""
    return {name: data for s in streams for name, data in s.members().items()}


def summary_lines(streams: list[RegionCommandStream], target: Target) -> list[str]:
    """What compile says of the command streams (nothing without them), and what the host library is for."""
    if not streams:
        return []
    total = sum(s.vela.summary.inference_time_s for s in streams)
    sram = max(s.vela.summary.sram_bytes for s in streams)
    vela = streams[0].vela
    lines = [
        f"  Vela {vela.version}: {len(streams)} NPU region(s) compiled to command streams for {target.vela.accelerator_config} "
        f"({target.vela.system_config}, {target.vela.memory_mode}): estimated {total * 1e6:.1f} us on the NPU, "
        f"SRAM {sram / 1024:.1f} KiB",
        f"  {command_stream_note(target.name, [s.region for s in streams])}",
    ]
    if target.firmware_host is not None:
        lines.append(
            f"  host library: the bit-exact simulation only, for running the model on this machine; on the device the "
            f"{target.firmware_host} runs your firmware, which hands the command streams to the NPU driver"
        )
    return lines
